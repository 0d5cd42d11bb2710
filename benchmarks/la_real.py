"""Real-data CPU-budget comparison on the 80 LA cases of ../shared/data/la2018_h5.

Protocol: the first 8 ids of train.list are labeled, the next 52 are used without labels, the
last 20 are a development test set never seen in training. Both trainers get the same plan
(half resolution, ``--spacing-scale 2``), patch, network, optimizer and number of iterations;
each is trained on all 60 training cases (``all``: no validation split, final checkpoint) and
scored on the 20 test cases at full resolution (probabilities resampled back, Dice per case).

    python benchmarks/la_real.py [--minutes 20] [--trainers VerSemiTrainer SupervisedTrainer]

Equal budget means equal wall time: each trainer's seconds per iteration are measured in a short
calibration run first, and its iteration count set to fill ``--minutes``.

Writes ``benchmarks/_work/la_real/results.json`` and prints a table. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
H5 = REPO.parent / "shared" / "data" / "la2018_h5"
BIN = Path(sys.executable).parent
PATCH = ["48", "64", "80"]
FEATURES = ["16", "32", "64", "128"]  # the last value repeats for deeper stages


def run(command: list[str], env: dict) -> float:
    started = time.time()
    subprocess.run(command, check=True, env=env)
    return time.time() - started


def make_source(work: Path) -> Path:
    """The h5 layout with train.list = first 60 ids, test.list = last 20 (symlinked cases)."""
    ids = [line.strip() for line in (H5 / "train.list").read_text().splitlines() if line.strip()]
    source = work / "la_dev_h5"
    source.mkdir(parents=True, exist_ok=True)
    for case_id in ids:
        if not (source / case_id).exists():
            (source / case_id).symlink_to(H5 / case_id)
    (source / "train.list").write_text("\n".join(ids[:60]) + "\n")
    (source / "test.list").write_text("\n".join(ids[60:]) + "\n")
    return source


def predict_dice(checkpoint: Path, raw: Path) -> list[dict]:
    """Dice of each test case at full resolution (crop, normalize, resample as the plan says)."""
    from versemi.datasets.layout import load_dataset
    from versemi.datasets.io import read_image, read_label
    from versemi.preprocessing.cropping import crop, nonzero_bbox
    from versemi.preprocessing.normalization import normalize
    from versemi.preprocessing.resampling import resample_image
    from versemi.training.checkpoint import load_checkpoint
    from versemi.training.trainers import find_trainer
    from versemi.training.config import TrainingConfig
    from versemi.training.validation import dice, predict_case_probabilities

    state = load_checkpoint(checkpoint)
    plans, config = state["plans"], TrainingConfig.from_dict(state["config"])
    trainer = find_trainer(state["trainer"])(plans, Path("."), state["configuration"], state["fold"],
                                            Path("/tmp"), config)
    model = trainer.build_network()
    model.load_state_dict(state["network"])
    model.eval()
    plan = plans["datasets"]["LA"]
    results = []
    for case in load_dataset(raw).test_cases():
        image, geometry = read_image(case.images)
        label, _ = read_label(case.label)
        bbox = nonzero_bbox(image)
        cropped = normalize(crop(image, bbox), plan["normalization"])
        small = resample_image(cropped, geometry.spacing_zyx, plan["target_spacing"])
        probabilities = predict_case_probabilities(model, small, [0], trainer.patch_size, torch.device("cpu"))
        full = F.interpolate(probabilities[None], size=cropped.shape[1:], mode="trilinear")[0, 0].numpy()
        prediction = np.zeros(label.shape, bool)
        (z0, z1), (y0, y1), (x0, x1) = bbox
        prediction[z0:z1, y0:y1, x0:x1] = full > 0.5
        results.append({"case": case.case_id, "dice": dice(prediction, label > 0)})
    return results


def train_command(name: str, epochs: int, iterations_per_epoch: int) -> list[str]:
    return [str(BIN / "versemi_train"), "3d_fullres", "all", "-e", "LA8_half", "-tr", name,
            "--epochs", str(epochs), "--iterations-per-epoch", str(iterations_per_epoch),
            "--patch-size", *PATCH, "--batch-size", "2", "--features", *FEATURES,
            "--optimizer", "adam", "--lr", "3e-3", "--num-workers", "1",
            "--method", json.dumps({"stage1_fraction": 0.2})]


def calibrate(name: str, work: Path, env: dict) -> float:
    """Seconds per training iteration of ``name`` (second epoch of a short run, after warm-up)."""
    from versemi.training.checkpoint import load_checkpoint
    scratch = work / "calibration"
    shutil.rmtree(scratch, ignore_errors=True)
    run(train_command(name, 2, 8), {**env, "VERSEMI_RESULTS": str(scratch)})
    history = load_checkpoint(scratch / "LA8_half" / f"{name}__3d_fullres" / "fold_all" / "checkpoint_final.pth")["history"]
    return history["epoch_seconds"][-1] / 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="training wall time per trainer")
    parser.add_argument("--iterations", type=int, help="train this many iterations instead of calibrating to --minutes")
    parser.add_argument("--trainers", nargs="+", default=["VerSemiTrainer", "SupervisedTrainer"])
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "_work" / "la_real")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not H5.is_dir():
        sys.exit(f"real LA data not found at {H5}: this benchmark needs ../shared beside the checkout")
    env = {**os.environ, "VERSEMI_ROOT": str(args.work), "OMP_NUM_THREADS": str(args.threads)}
    raw = args.work / "raw" / "LA"
    if not raw.is_dir():
        run([str(BIN / "versemi_convert"), "la-h5", str(make_source(args.work)), "-o", str(raw)], env)
    run([str(BIN / "versemi_plan_and_preprocess"), "-d", "LA", "--labeled", "LA=8", "-e", "LA8_half",
         "--spacing-scale", "2", "-np", "2", "--quiet"], env)
    epochs = 10
    report = {"minutes": args.minutes, "patch": PATCH, "features": FEATURES, "trainers": {}}
    for name in args.trainers:
        folder = args.work / "results" / "LA8_half" / f"{name}__3d_fullres" / "fold_all"
        seconds, iterations = None, None
        if not (folder / "checkpoint_final.pth").is_file():
            iterations = args.iterations or max(epochs, int(args.minutes * 60 / calibrate(name, args.work, env)))
            seconds = run(train_command(name, epochs, iterations // epochs), env)
        cases = predict_dice(folder / "checkpoint_final.pth", raw)
        report["trainers"][name] = {"train_seconds": seconds, "iterations": iterations,
                                    "mean_dice": float(np.mean([c["dice"] for c in cases])), "cases": cases}
        print(f"{name}: mean Dice {report['trainers'][name]['mean_dice']:.4f} on {len(cases)} test cases, "
              f"training {seconds if seconds is None else round(seconds)} s")
    (args.work / f"results_{'_'.join(args.trainers)}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
