"""Hard edges: constant images, two runs writing the same place, a full disk, a kill during bundle export."""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from versemi import atomic
from versemi.atomic import write_json
from versemi.bundles import export as bundle_export
from versemi.cli import export_bundle_main, plan_and_preprocess_main, train_main
from versemi.datasets.io import Geometry, write_image
from versemi.errors import InputError, input_error
from versemi.inference import load_models, predict_cases
from versemi.locks import LOCK_NAME, folder_lock, run_lock
from versemi.model.checkpoint import save_checkpoint
from versemi.parallel import map_with_progress
from versemi.preprocessing.cache import write_array

from conftest import write_tiny_dataset


GEOMETRY = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
SHAPE = (16, 16, 16)
TRAINER = "SupervisedTrainer"
TRAINING = ["-tr", TRAINER, "--patch-size", "16", "16", "16", "--batch-size", "2", "--features", "4", "8",
            "--num-workers", "0", "--val-iterations", "1", "--epochs", "1", "--iterations-per-epoch", "1",
            "--no-augmentation", "--quiet"]


def plan(raw: Path, plans: Path, *args: str) -> int:
    return plan_and_preprocess_main(["--raw", str(raw), "--plans-root", str(plans), "--quiet", "-np", "1",
                                     "-d", "Toy", *args])


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----- constant images -----
def test_constant_images_without_foreground_are_warned_about_by_name(tmp_path, capsys):
    raw, plans = tmp_path / "raw", tmp_path / "plans"
    folder = write_tiny_dataset(raw / "Toy", unlabeled=1)
    write_image(np.zeros((6, 8, 10), np.float32), GEOMETRY, folder / "imagesUnlabeled" / "unl0_0000.nii.gz")
    write_image(np.full((6, 8, 10), 5, np.float32), GEOMETRY, folder / "imagesTr" / "case2_0000.nii.gz")
    write_image(np.zeros((6, 8, 10), np.uint8), GEOMETRY, folder / "labelsTr" / "case2.nii.gz")  # no foreground
    assert plan(raw, plans, "--verify-only") == 0
    assert plan(raw, plans) == 0
    err = capsys.readouterr().err
    for name, value in (("unl0_0000.nii.gz", 0), ("case2_0000.nii.gz", 5)):
        lines = [line for line in err.splitlines() if name in line]
        assert len(lines) == 2, err  # once in the check, once when planning
        assert all(line.startswith("warning: ") and f"image is constant (every voxel {value})" in line
                   for line in lines)
    assert "case0_0000" not in err and "fix:" in err
    assert (plans / "Toy" / "plans.json").is_file()


def test_constant_labeled_image_with_foreground_is_a_problem_reported_with_the_others(tmp_path, capsys):
    raw, plans = tmp_path / "raw", tmp_path / "plans"
    folder = write_tiny_dataset(raw / "Toy")
    write_image(np.zeros((6, 8, 10), np.float32), GEOMETRY, folder / "imagesTr" / "case1_0000.nii.gz")
    label = np.zeros((6, 8, 10), np.uint8)
    label[0, 0, 0] = 7
    write_image(label, GEOMETRY, folder / "labelsTr" / "case2.nii.gz")
    assert plan(raw, plans) == 2
    err = capsys.readouterr().err
    assert "2 problems found" in err and "label values [7] are not declared" in err
    problem = next(line for line in err.splitlines() if "case1_0000.nii.gz" in line)
    assert "image is constant (every voxel 0) but its label marks 60 voxel(s) as foreground" in problem
    assert "fix: replace the image with the real scan" in err
    assert not plans.exists(), "nothing may be written when the input is bad"


# ----- locks -----
def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    with folder_lock(tmp_path / "fold_0", "versemi_train") as lock:
        assert lock == tmp_path / "fold_0" / LOCK_NAME
        with pytest.raises(InputError) as refused:
            with folder_lock(tmp_path / "fold_0", "versemi_train"):
                pytest.fail("entered a held lock")
        message = str(refused.value)
        assert str(lock) in message and f"process {os.getpid()} on this host" in message
        assert "fix: wait for it to finish or stop it" in message
        assert json.loads(lock.read_text(encoding="utf-8"))["pid"] == os.getpid(), "the refused run keeps off the holder's lock"
    assert not lock.exists(), "released on exit"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    lock = tmp_path / LOCK_NAME
    pid = _dead_pid()
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2024-01-01 00:00:00",
                                "command": "versemi_predict"}))
    with folder_lock(tmp_path, "prediction"):
        assert json.loads(lock.read_text(encoding="utf-8"))["pid"] == os.getpid()
    assert not lock.exists()
    err = capsys.readouterr().err
    assert f"note: {lock}: taking over the lock of versemi_predict (process {pid}" in err


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere.invalid", "started": "x", "command": "y"}))
    with pytest.raises(InputError, match="on host elsewhere.invalid"):
        with run_lock(lock, "prediction"):
            pass
    assert "elsewhere.invalid" in lock.read_text(encoding="utf-8")


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from versemi.locks import folder_lock
    with folder_lock(sys.argv[1], "versemi_predict"):
        print("held", flush=True)
        time.sleep(120)
""")


def test_a_lock_held_by_another_process_refuses_until_that_process_is_killed(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=f"versemi_predict \\(process {child.pid} on this host"):
            with folder_lock(tmp_path, "prediction"):
                pass
    finally:
        child.kill()
        child.wait()
    assert (tmp_path / LOCK_NAME).is_file(), "a killed run cannot remove its lock"
    with folder_lock(tmp_path, "prediction"):  # stale now: taken over
        pass


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> SimpleNamespace:
    """The tiny dataset Toy planned and preprocessed."""
    root = tmp_path_factory.mktemp("planned")
    write_tiny_dataset(root / "raw" / "Toy", num_cases=3, shape=SHAPE)
    assert plan(root / "raw", root / "plans") == 0
    return SimpleNamespace(raw=root / "raw", plans=root / "plans",
                           plans_json=json.loads((root / "plans" / "Toy" / "plans.json").read_text(encoding="utf-8")))


def test_preprocessing_the_same_cache_twice_at_once_is_refused(planned, capsys):
    cache = planned.plans / "Toy" / "3d_fullres"
    with folder_lock(cache, "preprocessing"):
        assert plan(planned.raw, planned.plans) == 2
    err = capsys.readouterr().err
    assert str(cache / LOCK_NAME) in err and "so preprocessing cannot run now" in err
    assert plan(planned.raw, planned.plans) == 0  # released: runs again


def test_training_the_same_fold_twice_at_once_is_refused(planned, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VERSEMI_RESULTS", str(tmp_path / "results"))
    fold = tmp_path / "results" / "Toy" / f"{TRAINER}__3d_fullres" / "fold_all"
    with folder_lock(fold, "versemi_train"):
        assert train_main(["3d_fullres", "all", "--plans-root", str(planned.plans), *TRAINING]) == 2
    err = capsys.readouterr().err
    assert str(fold / LOCK_NAME) in err and "so versemi_train cannot run now" in err
    assert sorted(p.name for p in fold.iterdir()) == [], "nothing trained, nothing written"


def test_predicting_into_the_same_folder_twice_at_once_is_refused(planned, tmp_path):
    output = tmp_path / "predictions"
    ensemble = SimpleNamespace(plans=planned.plans_json, in_channels=1)  # refused before any network runs
    with folder_lock(output, "prediction"):
        with pytest.raises(InputError, match="so prediction cannot run now"):
            predict_cases([planned.raw / "Toy" / "imagesTr"], output, "Toy", ensemble, show_progress=False)
    assert sorted(p.name for p in output.iterdir()) == []


# ----- a full disk -----
def fail_for_lack_of_space(code: int = errno.ENOSPC):
    """A writer that writes some bytes to its file, then fails as a full disk makes it."""
    def write(*args, **kwargs):
        target = next(a for a in (*args, *kwargs.values()) if isinstance(a, (str, Path)) and ".partial" in str(a))
        Path(target).write_bytes(b"half")
        raise OSError(code, os.strerror(code))
    return write


def no_free_space(monkeypatch) -> None:
    real = os.statvfs
    monkeypatch.setattr(atomic.os, "statvfs", lambda path: os.statvfs_result((*real(path)[:3], 0, 0, *real(path)[5:])))


def _checkpoint(target: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch, "save", fail_for_lack_of_space())
    save_checkpoint(target, {"weights": torch.zeros(3)})


def _cache_array(target: Path, monkeypatch) -> None:
    def create(array, urlpath, **kwargs):  # what blosc2 raises when the disk fills
        Path(urlpath).write_bytes(b"half")
        raise RuntimeError("Error while creating the NDArray")
    monkeypatch.setattr(blosc2, "asarray", create)
    no_free_space(monkeypatch)
    write_array(np.zeros((1, 4, 4, 4), np.float32), target)


def _prediction(target: Path, monkeypatch) -> None:
    monkeypatch.setattr(sitk, "WriteImage", fail_for_lack_of_space(errno.EDQUOT))
    write_image(np.zeros((4, 4, 4), np.uint8), GEOMETRY, target)


def _truncated_prediction(target: Path, monkeypatch) -> None:
    # SimpleITK only prints when the disk fills, and leaves a truncated file
    monkeypatch.setattr(sitk, "WriteImage", lambda image, path, **kwargs: Path(path).write_bytes(b"half"))
    no_free_space(monkeypatch)
    write_image(np.zeros((4, 4, 4), np.uint8), GEOMETRY, target)


def _json(target: Path, monkeypatch) -> None:
    monkeypatch.setattr(Path, "write_text", fail_for_lack_of_space())
    write_json({"a": 1}, target)


@pytest.mark.parametrize("write, name", [(_checkpoint, "checkpoint_latest.pth"), (_cache_array, "case0_data.b2nd"),
                                         (_prediction, "case0.nii.gz"), (_truncated_prediction, "case0.nii.gz"),
                                         (_json, "plans.json")])
@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_is_one_clear_error_and_leaves_no_partial_file(tmp_path, monkeypatch, write, name, existing):
    target = tmp_path / "out" / name
    if existing:
        target.parent.mkdir()
        target.write_bytes(b"the previous, complete file")
    monkeypatch.setenv("VERSEMI_RESULTS", str(tmp_path))
    with pytest.raises(InputError) as full:
        write(target, monkeypatch)
    monkeypatch.undo()
    message = str(full.value)
    assert f"{target}: no space left on device" in message and "nothing was written there" in message
    assert "fix: free space on that disk, or point $VERSEMI_RESULTS at a folder on another disk" in message
    assert (target.read_bytes() == b"the previous, complete file") if existing else not target.exists()
    assert hidden_leftovers(target.parent) == [], "no temporary file left"


def test_other_write_errors_stay_what_they_are(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", fail_for_lack_of_space(errno.EACCES))
    with pytest.raises(PermissionError):
        save_checkpoint(tmp_path / "checkpoint_latest.pth", {})
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_caching_stops_preprocessing_with_one_message(tmp_path, monkeypatch, capsys):
    raw, plans = tmp_path / "raw", tmp_path / "plans"
    write_tiny_dataset(raw / "Toy")
    monkeypatch.setattr(blosc2, "asarray", fail_for_lack_of_space())
    assert plan(raw, plans) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 problem found:") and "case0_data.b2nd: no space left on device" in err
    cache = plans / "Toy" / "3d_fullres" / "Toy"
    assert list(cache.rglob("*.partial*")) == [] and list(cache.glob("*.json")) == []


def _raise_input_error(item):
    raise input_error(f"file{item}", "no space left on device", "free space")


def test_input_errors_of_worker_processes_arrive_whole():
    copy = pickle.loads(pickle.dumps(input_error("a.nii.gz", "the problem", "the fix")))
    assert [(p.file, p.problem, p.fix) for p in copy.problems] == [("a.nii.gz", "the problem", "the fix")]
    with pytest.raises(InputError) as raised:
        map_with_progress(_raise_input_error, [1, 2], num_processes=2, desc="x", show_progress=False)
    assert str(raised.value).startswith("1 problem found:\n  - file") and "fix: free space" in str(raised.value)


# ----- bundle export and prediction of a trained model -----
@pytest.fixture(scope="module")
def trained(planned, tmp_path_factory, one_thread):
    """Toy trained for one step (fold all) and exported once."""
    root = tmp_path_factory.mktemp("trained")
    env = pytest.MonkeyPatch()
    env.setenv("VERSEMI_PLANS", str(planned.plans))
    env.setenv("VERSEMI_RESULTS", str(root / "results"))
    try:
        assert train_main(["3d_fullres", "all", *TRAINING]) == 0
        bundle = root / "bundles" / "toy"
        assert export(bundle) == 0
        yield SimpleNamespace(root=root, bundle=bundle, experiment=root / "results" / "Toy")
    finally:
        env.undo()


class Killed(BaseException):
    """An abrupt stop that no ``except Exception`` catches (as KeyboardInterrupt)."""


def export(output: Path, *args: str) -> int:
    return export_bundle_main(["-tr", TRAINER, "-f", "all", "-p", "Toy", "-o", str(output), *args])


def bundle_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_an_export_failing_midway_keeps_the_previous_bundle_and_the_next_one_works(trained, tmp_path, monkeypatch):
    output = tmp_path / "toy"
    shutil.copytree(trained.bundle, output)
    previous = bundle_files(output)
    real_write, written = bundle_export._write, []

    def killed_after_two_files(folder, relative, data):
        if len(written) == 2:
            raise Killed
        real_write(folder, relative, data)
        written.append(relative)

    monkeypatch.setattr(bundle_export, "_write", killed_after_two_files)
    with pytest.raises(Killed):
        bundle_export.export_bundle(output, "Toy", folds=["all"], trainer=TRAINER, overwrite=True)
    assert bundle_files(output) == previous and hidden_leftovers(tmp_path) == []
    monkeypatch.setattr(bundle_export, "_write", real_write)
    assert export(output, "--overwrite") == 0
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.slow
def test_leftovers_of_a_killed_export_neither_block_nor_confuse_the_next(trained, tmp_path, capsys):
    output = tmp_path / "toy"
    shutil.copytree(trained.bundle, output)
    previous = bundle_files(output)
    # killed while writing: a partial folder; killed between the two renames: the previous bundle moved aside
    (tmp_path / ".toy.partial-k1ll3d" / "configs").mkdir(parents=True)
    (tmp_path / ".toy.partial-k1ll3d" / "configs" / "metadata.json").write_text("{")
    (tmp_path / ".toy.old-k1ll3d").mkdir()
    output.rename(tmp_path / ".toy.old-k1ll3d" / "toy")
    (tmp_path / ".other.partial-abc").mkdir()  # another bundle's: not ours to touch
    assert export(output) == 2
    err = capsys.readouterr().err
    assert "put back the bundle an interrupted export had moved aside" in err and "exists already" in err
    assert bundle_files(output) == previous
    assert hidden_leftovers(tmp_path) == [".other.partial-abc"]
    assert export(output, "--overwrite") == 0


KILL_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    real_replace = os.replace
    def replace_then_die(source, target):
        if ".partial-" in str(source):  # the old bundle is moved aside, the new one not yet in place
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(source, target)
    os.replace = replace_then_die
    from versemi.cli import export_bundle_main
    export_bundle_main(sys.argv[1:])
""")


@pytest.mark.slow
def test_an_export_killed_with_sigkill_loses_nothing_and_the_next_export_works(trained, tmp_path):
    output = tmp_path / "toy"
    shutil.copytree(trained.bundle, output)
    previous = bundle_files(output)
    args = ["-tr", TRAINER, "-f", "all", "-p", "Toy", "-o", str(output), "--overwrite"]
    child = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, *args], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert child.returncode == -9, child.stderr[-2000:]
    assert not output.exists() and {n.split("-")[0] for n in hidden_leftovers(tmp_path)} == {".toy.old", ".toy.partial",
                                                                                          ".toy.lock"}
    assert export(output) == 2, "the previous bundle is back, and is not replaced unasked"
    assert bundle_files(output) == previous
    assert export(output, "--overwrite") == 0 and hidden_leftovers(tmp_path) == []


@pytest.mark.slow
def test_exporting_the_same_bundle_twice_at_once_is_refused(trained, tmp_path, capsys):
    output = tmp_path / "toy"
    with run_lock(tmp_path / ".toy.lock", "versemi_export_bundle"):
        assert export(output) == 2
    assert "so versemi_export_bundle cannot run now" in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.slow
def test_a_full_disk_during_export_or_prediction_leaves_nothing(trained, planned, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bundle_export, "_write",
                        lambda folder, relative, data: fail_for_lack_of_space()(folder / relative.replace("/", "_")))
    assert export(tmp_path / "toy") == 2
    assert f"{tmp_path / 'toy'}: no space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(sitk, "WriteImage", fail_for_lack_of_space())
    ensemble = load_models(trained.experiment, ["all"], TRAINER)
    with pytest.raises(InputError, match="case0.nii.gz: no space left on device"):
        predict_cases([planned.raw / "Toy" / "imagesTr"], tmp_path / "predictions", "Toy", ensemble,
                      show_progress=False, background_io=False)
    assert list((tmp_path / "predictions").iterdir()) == []
