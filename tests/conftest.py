"""Shared fixtures: toy synthetic datasets and small hand-made raw datasets."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from versemi.datasets.io import Geometry, write_image
from versemi.datasets.layout import write_dataset_json
from versemi.datasets.synthetic import SyntheticConfig, make_synthetic
from versemi.training.data import sub_batch_pairs

# prediction in tests runs in PyTorch (subprocesses inherit this); tests/test_cpu_runtime.py asks for
# OpenVINO with --backend, so that not every trained toy model is converted
os.environ["VERSEMI_PREDICT_BACKEND"] = "torch"

SHARED_LA = Path(__file__).resolve().parents[2] / "shared" / "data" / "la2018_h5"
TOY = SyntheticConfig(num_labeled=5, num_unlabeled=2, num_test=1, shape_la=(32, 32, 24),
                      shape_pancreas=(40, 40, 12), seed=3)


@pytest.fixture(scope="session")
def toy_raw_master(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw_master")
    make_synthetic(root, TOY, show_progress=False)
    return root


@pytest.fixture
def toy_raw(toy_raw_master, tmp_path) -> Path:
    """A private copy of the toy synthetic raw root (DemoLA, DemoPancreas) that a test may damage."""
    root = tmp_path / "raw"
    shutil.copytree(toy_raw_master, root)
    return root


def write_tiny_dataset(folder: Path, num_cases: int = 3, shape=(6, 8, 10), spacing=(1.0, 1.0, 2.0),
                       ending: str = ".nii.gz", channels=("MRI",), unlabeled: int = 0, two_labels: bool = False) -> Path:
    """A small valid raw dataset: blocks of foreground in noise, labels 0/1 (with ``two_labels``,
    a second block labeled 2)."""
    rng = np.random.default_rng(0)
    geometry = Geometry(spacing, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    for split, count, prefix in (("imagesTr", num_cases, "case"), ("imagesUnlabeled", unlabeled, "unl")):
        for i in range(count):
            label = np.zeros(shape, np.uint8)
            label[1:4, 2:6, 3:8] = 1
            if two_labels:
                label[-4:-1, -6:-2, -8:-3] = 2
            for c in range(len(channels)):
                image = (rng.normal(1.0, 0.2, shape) + 2 * label).astype(np.float32)
                write_image(image, geometry, folder / split / f"{prefix}{i}_{c:04d}{ending}")
            if split == "imagesTr":
                write_image(label, geometry, folder / "labelsTr" / f"{prefix}{i}{ending}")
    labels = {"background": 0, "target": 1, **({"second": 2} if two_labels else {})}
    write_dataset_json(folder, channels, labels, num_cases, ending)
    return folder


TOY_EXPERIMENT = "DemoLA_DemoPancreas"
TINY_TRAINING = ["--patch-size", "16", "32", "32", "--batch-size", "2", "--features", "4", "8", "16",
                 "--num-workers", "0", "--val-iterations", "1", "--epochs", "1", "--iterations-per-epoch", "2",
                 "--no-augmentation", "--supervised-warm-up", "0"]  # a method's own steps from the first iteration


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions: one thread is fastest, and stays fast on a CPU shared with other jobs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def toy_experiment(raw: Path, root: Path, folds: dict[str, list[str]], **env_vars: str):
    """Plan the toy datasets under ``root`` and train each fold with TINY_TRAINING + its extra args.

    Yields the experiment's results folder; VERSEMI_PLANS / VERSEMI_RESULTS (and ``env_vars``)
    point into ``root`` until the block ends.
    """
    from versemi.cli import train_main
    from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess

    env = pytest.MonkeyPatch()
    env.setenv("VERSEMI_PLANS", str(root / "plans"))
    env.setenv("VERSEMI_RESULTS", str(root / "results"))
    for name, value in env_vars.items():
        env.setenv(name, value)
    try:
        plan_and_preprocess(ExperimentRequest(["DemoLA", "DemoPancreas"], raw, root / "plans", num_processes=1,
                                              show_progress=False))
        for fold, extra in folds.items():
            assert train_main(["3d_fullres", fold, *TINY_TRAINING, *extra]) == 0
        yield root / "results" / TOY_EXPERIMENT
    finally:
        env.undo()


# SupervisedTrainer trained long enough (Adam) to draw real boundaries, so that agreement between two
# prediction paths is a real test
BOUNDARY_TRAINING = ["-tr", "SupervisedTrainer", "--optimizer", "adam", "--lr", "0.01", "--iterations-per-epoch", "60"]


@contextmanager
def supervised_toy_model(raw: Path, root: Path):
    """The toy experiment with fold 0 of ``BOUNDARY_TRAINING``: its raw root, results, preprocessing
    cache and checkpoint (inside ``toy_experiment``'s block)."""
    with toy_experiment(raw, root, {"0": BOUNDARY_TRAINING}) as experiment:
        yield SimpleNamespace(raw=raw, experiment=experiment, cache=root / "plans" / TOY_EXPERIMENT / "3d_fullres",
                              checkpoint=experiment / "SupervisedTrainer__3d_fullres" / "fold_0" / "checkpoint_final.pth")


@pytest.fixture(scope="module")
def planned(toy_raw_master, tmp_path_factory) -> Path:
    """The toy pair planned and preprocessed; returns the plans root."""
    from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess

    plans_root = tmp_path_factory.mktemp("plans")
    plan_and_preprocess(ExperimentRequest(["DemoLA", "DemoPancreas"], toy_raw_master, plans_root,
                                          num_processes=1, show_progress=False))
    return plans_root


@pytest.fixture
def results(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VERSEMI_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


def make_trainer(name: str, planned: Path, tmp_path: Path, plans: dict | None = None,
                 configuration: str = "3d_fullres", output: Path | None = None, **config):
    """A set-up trainer of the planned toy experiment at tiny size (fold 0, 10 epochs, Adam), writing
    to ``output`` (default ``tmp_path / name``)."""
    import json

    from versemi.model.config import TrainingConfig
    from versemi.training.trainers import find_trainer

    plans = plans or json.loads((planned / TOY_EXPERIMENT / "plans.json").read_text(encoding="utf-8"))
    settings = dict(epochs=10, patch_size=[16, 32, 32], batch_size=2, features=[4, 8, 16], num_workers=0,
                    optimizer="adam", lr=3e-3, supervised_warm_up="0")
    settings.update(config)
    trainer = find_trainer(name)(plans, planned, configuration, "0", output or tmp_path / name,
                                 TrainingConfig(**settings))
    trainer.setup()
    return trainer


def claims_of_absent_structures(trainer, batch: dict, declared=None) -> float:
    """Mean foreground probability, over a batch, of the prompts that ``declared`` (a trainer; by
    default ``trainer``) declares absent from each sample's dataset."""
    import torch

    from versemi.training.losses import foreground_probability

    with torch.no_grad():
        prompts = torch.arange(trainer.num_prompts).expand(batch["data"].shape[0], -1)
        out = trainer.network(batch["data"], prompts)
        probability = foreground_probability(out if torch.is_tensor(out) else out[0])
    absent = (declared or trainer).absent_prompts(batch["dataset"])[(...,) + (None,) * 3]
    return float((probability * absent).sum() / (absent.sum() * probability[0, 0].numel()))


def fit_fixed_batch(trainer, steps: int) -> tuple[list[float], dict]:
    """Optimize ``steps`` times on the trainer's first batch(es) (every network of the trainer);
    returns the losses and the last terms."""
    labeled = trainer.labeled_source[0]
    unlabeled = trainer.unlabeled_source[0] if trainer.unlabeled_source is not None else None
    # a step of sub-batches (per-dataset patches, --dataset-batches each): the mean over its sub-batches
    pairs = sub_batch_pairs(labeled, unlabeled)
    optimizers = [trainer.optimizer] + [extra.optimizer for extra in trainer.extra_networks.values()]
    losses = []
    for _ in range(steps):
        for optimizer in optimizers:
            optimizer.zero_grad()
        total = 0.0
        for own, other in pairs:
            terms = trainer.train_step(own, other)
            (terms["loss"] / len(pairs)).backward()
            total += float(terms["loss"].detach()) / len(pairs)
        for optimizer in optimizers:
            optimizer.step()
        losses.append(total)
    return losses, terms


KILL_AT_ITERATION_5 = """
import os, signal, sys
import versemi.training.trainer as loop
from versemi.cli import train_main
real = loop.Trainer.seed_iteration
def seed_then_die(self, iteration):
    if iteration == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, iteration)
loop.Trainer.seed_iteration = seed_then_die
train_main(sys.argv[1:])
"""


def train_killed_and_resumed(args: list[str], trainer: str, results: Path, tmp_path: Path) -> tuple[dict, dict]:
    """The final checkpoints of an uninterrupted ``versemi_train args`` and of one SIGKILLed at
    iteration 5, then continued with ``--continue``."""
    import os
    import subprocess
    import sys

    import torch

    from versemi.cli import train_main

    assert train_main(args) == 0
    folder = f"{TOY_EXPERIMENT}/{trainer}__{args[0]}/fold_{args[1]}/checkpoint_final.pth"
    uninterrupted = torch.load(results / folder, weights_only=False)
    os.environ["VERSEMI_RESULTS"] = str(tmp_path / "killed")
    # the child computes with one thread like this process (another thread count rounds differently)
    child = subprocess.run([sys.executable, "-c", KILL_AT_ITERATION_5, *args], capture_output=True,
                           encoding="utf-8", errors="replace", env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == -9, child.stderr[-2000:]
    assert train_main([*args, "--continue"]) == 0
    return uninterrupted, torch.load(tmp_path / "killed" / folder, weights_only=False)


def assert_same_weights(first: dict, second: dict, parts=("network",)) -> None:
    """Checkpoints hold bit-identical weights: ``network``, a teacher kept under ``extra``, or
    ``networks`` (every further network of a trainer with several, with its optimizer state)."""
    import torch

    def same(a, b, where):
        if torch.is_tensor(a):
            assert torch.equal(a, b), where
        elif isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for key in a:
                same(a[key], b[key], (*where, key))
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, (*where, i))
        else:
            assert a == b, where

    for part in parts:
        if part == "networks":
            assert first["networks"].keys() == second["networks"].keys()
            for name in first["networks"]:
                for kind in ("network", "optimizer", "scheduler"):
                    same(first["networks"][name][kind], second["networks"][name][kind], (name, kind))
            continue
        a = first["network"] if part == "network" else first["extra"][part]
        b = second["network"] if part == "network" else second["extra"][part]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (part, key)
