"""Training at toy size: each trainer learns, resume is exact, DDP runs, bad setups fail clearly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from versemi.cli import train_main
from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess
from versemi.training.trainers import discover_trainers

from conftest import fit_fixed_batch, make_trainer

# a few iterations: without --supervised-warm-up 0 (auto) a method would train supervised throughout
TINY = ["--patch-size", "16", "32", "32", "--batch-size", "2", "--features", "4", "8", "16", "--num-workers", "0",
        "--val-iterations", "1", "--supervised-warm-up", "0"]
EXPERIMENT = "DemoLA_DemoPancreas"


def _history(results: Path, trainer: str = "VerSemiTrainer", fold: str = "0") -> dict:
    path = results / EXPERIMENT / f"{trainer}__3d_fullres" / f"fold_{fold}" / "checkpoint_final.pth"
    return torch.load(path, weights_only=False)["history"]


def _trainer(name: str, planned: Path, tmp_path: Path, **method):
    return make_trainer(name, planned, tmp_path, method=method)


@pytest.mark.parametrize("name,epoch", [("SupervisedTrainer", 0), ("VerSemiTrainer", 0), ("VerSemiTrainer", 9),
                                        ("MeanTeacherTrainer", 9)])
def test_each_trainer_reduces_its_loss_on_a_fixed_batch(planned, tmp_path, name, epoch):
    torch.manual_seed(0)
    trainer = _trainer(name, planned, tmp_path)
    trainer.epoch = epoch  # VerSemi: epoch 0 is stage 1, epoch 9 stage 2 (with unlabeled terms)
    losses, terms = fit_fixed_batch(trainer, 12)
    if name == "VerSemiTrainer" and epoch == 9:
        assert {"supervised", "synthetic", "consistency", "box"} <= set(terms)
    assert losses[-1] < 0.8 * losses[0], losses


def test_versemi_uses_one_backbone_pass_per_step(planned, tmp_path):
    trainer = _trainer("VerSemiTrainer", planned, tmp_path)
    trainer.epoch = 9
    calls = []
    trainer.model.backbone.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    trainer.train_step(trainer.labeled_source[0], trainer.unlabeled_source[0])
    # one pass over: 2 labeled images, 1 CutMix of the two halves, 2 labeled-into-unlabeled pastes
    assert calls == [5]


def test_cli_trains_and_writes_checkpoints_curves_and_validation(planned, results):
    assert train_main(["3d_fullres", "fold0", "--plans-root", str(planned), "--epochs", "2",
                       "--iterations-per-epoch", "2", *TINY]) == 0
    folder = results / EXPERIMENT / "VerSemiTrainer__3d_fullres" / "fold_0"
    for name in ("checkpoint_latest.pth", "checkpoint_final.pth", "checkpoint_best.pth", "progress.png",
                 "training_log.txt", "validation/summary.json"):
        assert (folder / name).is_file(), name
    state = torch.load(folder / "checkpoint_final.pth", weights_only=False)
    assert state["plans"]["experiment"] == EXPERIMENT and state["epoch"] == 2
    summary = json.loads((folder / "validation" / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["mean_dice"]) == {"DemoLA/left_atrium", "DemoPancreas/pancreas"}
    # a trained fold is not overwritten by accident
    assert train_main(["3d_fullres", "0", "--plans-root", str(planned), *TINY]) == 2


KILL_AT_ITERATION_5 = textwrap.dedent("""
    import os, signal, sys
    import versemi.training.trainer as loop
    from versemi.cli import train_main
    real = loop.Trainer.seed_iteration
    def seed_then_die(self, iteration):
        if iteration == 5:
            os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of epoch 2
        real(self, iteration)
    loop.Trainer.seed_iteration = seed_then_die
    train_main(sys.argv[1:])
""")


@pytest.mark.slow
def test_killed_and_resumed_run_continues_the_same_loss_sequence(planned, results, tmp_path):
    args = ["3d_fullres", "0", "--plans-root", str(planned), "--epochs", "3", "--iterations-per-epoch", "3", *TINY,
            "--num-workers", "1"]
    assert train_main(args) == 0
    uninterrupted = _history(results)
    os.environ["VERSEMI_RESULTS"] = str(tmp_path / "killed")
    child = subprocess.run([sys.executable, "-c", KILL_AT_ITERATION_5, *args], capture_output=True,
                           encoding="utf-8", errors="replace", env=dict(os.environ))
    assert child.returncode == -9, child.stderr[-2000:]
    assert train_main([*args, "--continue"]) == 0
    resumed = _history(tmp_path / "killed")
    assert len(resumed["iteration_losses"]) == 3
    for a, b in zip(uninterrupted["iteration_losses"], resumed["iteration_losses"]):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    assert "resumed at epoch 1" in (tmp_path / "killed" / EXPERIMENT / "VerSemiTrainer__3d_fullres" / "fold_0" /
                                    "training_log.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("trainer,extra", [
    ("VerSemiTrainer", []),
    # a teacher, pseudo-labels and feature taps, in both stages
    ("M3HLTrainer", ["--epochs", "2", "--method", '{"pretrain_fraction": 0.5}']),
])
@pytest.mark.slow
def test_ddp_with_two_cpu_processes(planned, results, trainer, extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "versemi.train", "3d_fullres", "1", "--plans-root", str(planned), "--epochs", "1",
               "--iterations-per-epoch", "2", "--num-gpus", "2", "--device", "cpu", *TINY, "--batch-size", "4",
               "-tr", trainer, *extra]
    run = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = results / EXPERIMENT / f"{trainer}__3d_fullres" / "fold_1"
    assert "batch 2 x 2 process(es)" in (folder / "training_log.txt").read_text(encoding="utf-8")
    assert (folder / "checkpoint_final.pth").is_file()


def test_missing_cache_is_a_clear_error(toy_raw_master, tmp_path, results, capsys):
    plans_root = tmp_path / "plans"
    plan_and_preprocess(ExperimentRequest(["DemoLA"], toy_raw_master, plans_root, num_processes=1,
                                          show_progress=False), preprocess=False)
    assert train_main(["3d_fullres", "0", "--plans-root", str(plans_root), *TINY]) == 2
    err = capsys.readouterr().err
    assert "cached case missing" in err and "versemi_plan_and_preprocess" in err


def test_plan_and_cache_mismatch_is_a_clear_error(planned, tmp_path, results, capsys):
    copy = tmp_path / "plans"
    (copy / EXPERIMENT).mkdir(parents=True)
    os.symlink(planned / EXPERIMENT / "3d_fullres", copy / EXPERIMENT / "3d_fullres")
    plans = json.loads((planned / EXPERIMENT / "plans.json").read_text(encoding="utf-8"))
    plans["datasets"]["DemoLA"]["target_spacing"] = [2.0, 2.0, 2.0]
    (copy / EXPERIMENT / "plans.json").write_text(json.dumps(plans))
    assert train_main(["3d_fullres", "0", "--plans-root", str(copy), *TINY]) == 2
    assert "made with other settings than plans.json" in capsys.readouterr().err


def test_unknown_trainer_and_broken_module(planned, results, tmp_path, monkeypatch, capsys):
    assert train_main(["3d_fullres", "0", "--plans-root", str(planned), "-tr", "NoSuchTrainer", *TINY]) == 2
    err = capsys.readouterr().err
    assert "unknown trainer" in err and "VerSemiTrainer" in err and "SupervisedTrainer" in err
    package = tmp_path / "my_trainers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "broken.py").write_text("import not_a_module_anywhere\n")
    (package / "good.py").write_text("from versemi.training.trainers.supervised import SupervisedTrainer\n"
                                     "class MyTrainer(SupervisedTrainer):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found, broken = discover_trainers(("versemi.training.trainers", "my_trainers"))
    assert "MyTrainer" in found and "VerSemiTrainer" in found
    assert "my_trainers.broken" in broken and "not_a_module_anywhere" in broken["my_trainers.broken"]


def test_fold_names(planned, results, capsys):
    assert train_main(["3d_fullres", "fold7", "--plans-root", str(planned), *TINY]) == 2
    assert "use fold0 .. fold4, 0 .. 4 or all" in capsys.readouterr().err


@pytest.mark.parametrize("fixed", [["--epochs", "3"], ["--iterations-per-epoch", "5"],
                                   ["--epochs", "3", "--iterations-per-epoch", "5"]])
def test_time_budget_with_a_fixed_schedule_is_refused(fixed):
    from versemi.errors import InputError
    from versemi.training.run import build_parser, make_config

    args = build_parser().parse_args(["3d_fullres", "0", "--time-budget", "5", *fixed])
    with pytest.raises(InputError) as caught:
        make_config(args, None)
    message = str(caught.value)
    assert "the time budget sets the epochs and the iterations per epoch itself" in message
    assert all(flag in message for flag in fixed[::2])


def test_time_budget_with_epochs_fails_before_anything_is_written(planned, results, capsys):
    assert train_main(["3d_fullres", "0", "--plans-root", str(planned), *TINY, "--time-budget", "5",
                       "--epochs", "2"]) == 2
    assert "give either --time-budget or --epochs, not both" in capsys.readouterr().err
    assert not (results / EXPERIMENT).exists()


def test_a_cpu_trains_the_plans_cpu_preset_unless_told_otherwise(planned, tmp_path):
    """The plan stores a CPU preset (a quarter of the features, batch at most 4); a CPU run takes it
    where no --features/--batch-size is given, a GPU run and --network-size plan keep the plan's size."""
    from versemi.model.config import TrainingConfig
    from versemi.training.trainers import find_trainer

    plans = json.loads((planned / EXPERIMENT / "plans.json").read_text(encoding="utf-8"))
    configuration = plans["configurations"]["3d_fullres"]
    preset = configuration["cpu_preset"]
    assert preset["features"] == [max(8, f // 4) for f in configuration["network"]["features"]]
    assert preset["batch_size"] == min(configuration["batch_size"], 4)

    def built(device: str, **config):
        trainer = find_trainer("SupervisedTrainer")(plans, planned, "3d_fullres", "0", tmp_path / device,
                                                    TrainingConfig(**config), device)
        return trainer.effective.network_plan["features"], trainer.batch_size, trainer.config.network_size

    assert built("cpu") == (preset["features"], preset["batch_size"], "cpu")
    assert built("meta") == (configuration["network"]["features"], configuration["batch_size"], "plan")
    assert built("cpu", network_size="plan") == (configuration["network"]["features"], configuration["batch_size"],
                                                 "plan")
    assert built("cpu", batch_size=1) == (preset["features"], 1, "cpu")
    features = [4] * len(preset["features"])
    assert built("cpu", features=[4], batch_size=1) == (features, 1, "cpu")
    # runs saved before the preset continue at the size they trained
    old = {k: v for k, v in TrainingConfig().to_dict().items() if k != "network_size"}
    assert TrainingConfig.from_dict(old).network_size == "plan"


def test_network_size_cpu_needs_a_plan_with_the_preset(planned, tmp_path):
    from versemi.errors import InputError
    from versemi.model.config import TrainingConfig, resolve_network_size

    plans = json.loads((planned / EXPERIMENT / "plans.json").read_text(encoding="utf-8"))
    del plans["configurations"]["3d_fullres"]["cpu_preset"]
    with pytest.raises(InputError, match="no cpu_preset"):
        resolve_network_size(plans, "3d_fullres", TrainingConfig(network_size="cpu"), "cpu")
    config = TrainingConfig()
    assert resolve_network_size(plans, "3d_fullres", config, "cpu") is None and config.network_size == "plan"
    assert config.features is None and config.batch_size is None
