"""Shared by the time-budget benchmarks: one ``versemi_train`` process per run folder, its wall
time and load, prediction of a raw dataset's test cases, and what the final checkpoint records.

A run folder holds ``command.json`` (the arguments it was started with), ``train.log``, ``results/``
(the trainer's output), ``wall.json`` and, once the run finished, ``checkpoint.txt`` (the final
checkpoint's path): a folder with it is never trained again, one with only a latest checkpoint (a
killed run) is continued with ``--continue``.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent


@contextmanager
def preparing(work: Path):
    """Hold ``work``'s preparation lock while converting, planning and preprocessing: two commands
    started at once on one work folder then prepare it one after the other (the second finds the
    work done) instead of both writing the same plans, which failed one of them."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".prepare.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, on an error too
        yield


def parse_trainer_options(text: str) -> tuple[str, str, dict, tuple[str, ...]]:
    """(trainer, run label, ``--method`` settings, versemi_train flags) of a ``--trainers`` entry,
    ``Trainer`` or ``Trainer:key=value,...``: a key that starts with ``--`` is a versemi_train flag
    (``--unlabeled-batch-size=2``), any other a ``--method`` setting whose value is read as JSON
    (``weight_consistency=1``, ``stage2_labeled_cutmix=false``) or else kept as text."""
    trainer, _, options = text.partition(":")
    method, flags, label = {}, [], trainer.removesuffix("Trainer")
    for item in filter(None, options.split(",")):
        key, equals, value = item.partition("=")
        if not equals or not key:
            sys.exit(f"--trainers {text!r}: write each setting as key=value")
        # a file's path (--pretrained-2d=runs/x/model.pth) names the run folder by its file name alone
        label += f"_{key.lstrip('-')}={Path(value).name if key.startswith('--') and '/' in value else value}"
        if key.startswith("--"):
            flags += [key, value]
            continue
        try:
            method[key] = json.loads(value)
        except json.JSONDecodeError:
            method[key] = value
    return trainer, label, method, tuple(flags)


def fold_all_folder(folder: Path, experiment: str, trainer: str, configuration: str = "3d_fullres") -> Path:
    return folder / "results" / experiment / f"{trainer}__{configuration}" / "fold_all"


def start_training(command: list[str], folder: Path, experiment: str, trainer: str, plans: Path,
                   threads: int, configuration: str = "3d_fullres") -> subprocess.Popen | None:
    """Start ``command`` (a versemi_train argv) in ``folder``; None if that run already finished.
    A folder whose run was started with other arguments is refused, so settings never mix."""
    recorded = folder / "command.json"
    if recorded.is_file() and json.loads(recorded.read_text(encoding="utf-8"))[1:] != command[1:]:
        sys.exit(f"{folder} holds a run started as {recorded.read_text(encoding='utf-8')}: use another --work "
                 "for other settings, or move that folder away")
    if (folder / "checkpoint.txt").is_file():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(command), encoding="utf-8")
    resumed = (fold_all_folder(folder, experiment, trainer, configuration) / "checkpoint_latest.pth").is_file()
    if resumed:
        command = command + ["--continue"]
    env = {**os.environ, "VERSEMI_RESULTS": str(folder / "results"), "VERSEMI_PLANS": str(plans),
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = open(folder / "train.log", "a" if resumed else "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    process.started, process.folder, process.load_before = time.time(), folder, os.getloadavg()[0]
    process.checkpoint = fold_all_folder(folder, experiment, trainer, configuration) / "checkpoint_final.pth"
    process.resumed = resumed
    return process


def finish_training(process: subprocess.Popen) -> None:
    if process.wait() != 0:
        sys.exit(f"training failed: see {process.folder / 'train.log'}")
    (process.folder / "wall.json").write_text(json.dumps({"started": process.started,
                                                          "seconds": process.checkpoint.stat().st_mtime - process.started,
                                                          "load_before": process.load_before,
                                                          "load_after": os.getloadavg()[0],
                                                          "resumed": process.resumed}))
    (process.folder / "checkpoint.txt").write_text(str(process.checkpoint))


def training_wall_seconds(folder: Path, checkpoint: Path) -> float:
    """From the start of the training process to its final checkpoint (files written by
    ``finish_training``; runs recorded before ``started`` was stored: its file's time minus ``seconds``).
    A continued run counts from its last start."""
    wall_file = folder / "wall.json"
    wall = json.loads(wall_file.read_text(encoding="utf-8"))
    started = wall.get("started", wall_file.stat().st_mtime - wall["seconds"])
    return checkpoint.stat().st_mtime - started


def predict_test_cases(checkpoint: Path, raw: Path, predictions: Path, mirroring: bool, device: str = "cpu") -> float:
    """Predict every test case of ``raw`` in its own geometry into ``predictions`` (every label of the
    experiment, as the dataset's label values); returns the seconds."""
    from versemi.datasets.io import write_image
    from versemi.datasets.layout import load_dataset
    from versemi.inference.predictor import load_models, predict_case, predict_case_prompts
    from versemi.inference.prompt_names import resolve_prompts

    ensemble = load_models([checkpoint], device=device)
    prompts = resolve_prompts(ensemble.plans, None)
    started = time.time()
    for case in load_dataset(raw).test_cases():
        if len(prompts) == 1:
            result = predict_case(ensemble, case.images, prompts[0], step=0.5, mirroring=mirroring)
            labels = result.mask.astype(np.uint8)
        else:
            result = predict_case_prompts(ensemble, case.images, prompts, step=0.5, mirroring=mirroring)
            labels = result.labels
        write_image(labels, result.geometry, predictions / f"{case.case_id}.nii.gz")
    return time.time() - started


def training_record(folder: Path, state: dict) -> dict:
    """Iterations, time and load of a finished run, from its final checkpoint and ``wall.json``."""
    history = state["history"]
    iterations = len([x for epoch in history["iteration_losses"] for x in epoch])
    train_seconds = float(sum(history["epoch_seconds"]))
    wall = json.loads((folder / "wall.json").read_text(encoding="utf-8"))
    checkpoint = Path((folder / "checkpoint.txt").read_text(encoding="utf-8"))
    return {"iterations": iterations, "seconds_per_iteration": train_seconds / max(iterations, 1),
            "train_loop_seconds": train_seconds, "wall_seconds": training_wall_seconds(folder, checkpoint),
            "load": [wall["load_before"], wall["load_after"]], "resumed": wall.get("resumed", False), "budget": state["config"].get("budget"),
            "data_wait_seconds": float(sum(history.get("data_wait_seconds", []))),
            "peak_gpu_memory_gib": peak_memory(folder), "final_terms": (history.get("terms") or [{}])[-1]}


def peak_memory(folder: Path) -> float | None:
    """The largest peak GPU memory that the training log reports, if it trained on a GPU."""
    logs = list((folder / "results").glob("*/*/fold_all/training_log.txt"))
    values = [float(v) for log in logs for v in re.findall(r"peak GPU memory ([0-9.]+) GiB", log.read_text(encoding="utf-8"))]
    return max(values) if values else None
