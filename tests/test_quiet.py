"""One switch silences every progress bar: ``--quiet`` on a console script, or ``VERSEMI_QUIET=1``."""
from __future__ import annotations

import itertools
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

import versemi
from versemi import cli
from versemi.console import QUIET_VARIABLE, is_quiet, set_quiet
from versemi.inference.predictor import _run_cases
from versemi.parallel import map_with_progress
from versemi.training.trainer import Trainer

# the console scripts that draw progress bars (versemi_evaluate and versemi_export_bundle draw none)
WITH_PROGRESS = [cli.make_synthetic_main, cli.convert_main, cli.plan_and_preprocess_main, cli.train_main,
                 cli.predict_main, cli.find_postprocessing_main, cli.benchmark_main]


@pytest.fixture(autouse=True)
def not_quiet(monkeypatch):
    """Each test starts loud, whatever the environment says; monkeypatch puts the variable back."""
    monkeypatch.setenv(QUIET_VARIABLE, "0")


def _square(x: int) -> int:
    return x * x


def _train_one_epoch() -> float:
    """``Trainer.train_epoch`` on a stand-in with three steps of constant loss."""
    stub = SimpleNamespace(config=SimpleNamespace(iterations_per_epoch=3, epochs=5), epoch=0, is_main=True,
                           training_batches=itertools.repeat((None, None)), train_mode=lambda training: None,
                           optimize=lambda iteration, labeled, unlabeled: {"loss": 0.5})
    mean, _, _ = Trainer.train_epoch(stub)
    return mean


def _predict_two_cases() -> list[Path]:
    return _run_cases(["a", "b"], prepare=str, network=str, finish=lambda case, prepared, out: Path(out),
                      background_io=False, show_progress=True)


@pytest.mark.parametrize("run, bar", [
    (lambda: map_with_progress(_square, [1, 2, 3], 1, "preprocess demo"), "preprocess demo"),
    (_train_one_epoch, "epoch 1/5"),
    (_predict_two_cases, "predicting"),
], ids=["preprocessing", "training", "prediction"])
def test_quiet_silences_the_bar_that_is_drawn_otherwise(run, bar, capfd):
    loud = run()
    assert bar in capfd.readouterr().err
    set_quiet()
    assert run() == loud
    assert capfd.readouterr() == ("", "")


def test_the_environment_variable_is_the_switch(monkeypatch, capfd):
    monkeypatch.setenv(QUIET_VARIABLE, "1")
    assert is_quiet()
    map_with_progress(_square, [1, 2], 1, "preprocess demo")
    assert capfd.readouterr() == ("", "")
    monkeypatch.setenv(QUIET_VARIABLE, "0")
    assert not is_quiet()


@pytest.mark.parametrize("main", WITH_PROGRESS, ids=lambda main: main.__name__)
def test_every_console_script_with_progress_bars_takes_quiet(main, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--quiet" in capsys.readouterr().out


def test_a_quiet_command_prints_no_bar_and_leaves_the_switch_as_it_was(tmp_path, capfd):
    tiny = ["--num-labeled", "1", "--num-unlabeled", "0", "--num-test", "0", "--shape-la", "16", "16", "16",
            "--shape-pancreas", "16", "16", "12", "-np", "1"]
    assert cli.make_synthetic_main(["-o", str(tmp_path / "loud"), *tiny]) == 0
    assert "synthesising DemoLA" in capfd.readouterr().err
    assert cli.make_synthetic_main(["-o", str(tmp_path / "quiet"), *tiny, "--quiet"]) == 0
    assert "synthesising" not in capfd.readouterr().err
    assert not is_quiet()


def test_every_progress_bar_goes_through_the_switch():
    """tqdm is used in one module only, so no bar can ignore quiet."""
    package = Path(versemi.__file__).parent
    users = sorted(str(path.relative_to(package)) for path in package.rglob("*.py")
                   if re.search(r"^\s*(from|import) tqdm", path.read_text(encoding="utf-8"), re.MULTILINE))
    assert users == ["console.py"]
