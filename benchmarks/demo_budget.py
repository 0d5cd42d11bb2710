"""Equal-budget comparison on the two demo datasets at once: trainers that learn every structure of
several partially labeled datasets (DemoLA labels only its atrium, DemoPancreas only its pancreas).

    python benchmarks/demo_budget.py                    # MutualLearning vs VerSemi, 5 min, seeds 0 1
    python benchmarks/demo_budget.py --trainers MutualLearningTrainer VerSemiTrainer --minutes 5 --seeds 0 1

The built-in synthetic pair (``versemi_make_synthetic``, written into ``--work`` if absent) is
planned as one experiment; every run trains fold 0 with the same ``--time-budget``, patch,
network and optimizer, two side by side (one thread each, the same seed together), and its final
checkpoint is used. Each dataset's test images are then predicted with every prompt into one
label map (``versemi_predict -p all``: what a user of a model of every structure runs) and each
structure is scored against its own dataset's reference (Dice, %). The structure a dataset does
not label has no reference there and is reported as the share of its voxels claimed by the
other structure's value (lower is better: the atrium prompt should find nothing in a pancreas CT).
With ``--known-absent`` the pair is planned with ``--known-absent all`` (no atrium in a pancreas
CT, no pancreas in an atrium MRI), so the trainers learn those structures absent; prediction still
asks every prompt, so the claims measure what the network learnt. Use a ``--work`` of its own.
Finished runs and evaluations are reused. Writes ``<work>/demo_budget.json`` and ``.md``. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXPERIMENT = "DemoLA_DemoPancreas"
DATASETS = ("DemoLA", "DemoPancreas")


def prepare(work: Path, known_absent: bool = False) -> Path:
    from versemi.datasets.synthetic import make_synthetic
    from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess

    raw = work / "raw"
    if not (raw / "DemoPancreas" / "dataset.json").is_file():
        make_synthetic(raw, show_progress=False)
    plan_and_preprocess(ExperimentRequest(list(DATASETS), raw, work / "versemi_plans", num_processes=2,
                                          show_progress=False, known_absent="all" if known_absent else None))
    return raw


def run_folder(work: Path, trainer: str, seed: int) -> Path:
    return work / "runs" / trainer / f"seed{seed}"


def checkpoint_of(folder: Path, trainer: str) -> Path:
    return folder / "results" / EXPERIMENT / f"{trainer}__3d_fullres" / "fold_0" / "checkpoint_final.pth"


def start(args, work: Path, trainer: str, seed: int) -> subprocess.Popen | None:
    folder = run_folder(work, trainer, seed)
    if checkpoint_of(folder, trainer).is_file():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VERSEMI_RESULTS": str(folder / "results"), "VERSEMI_PLANS": str(work / "versemi_plans"),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [str(BIN / "versemi_train"), "3d_fullres", "0", "-e", EXPERIMENT, "-tr", trainer, "--time-budget",
               str(args.minutes), "--seed", str(seed), "--patch-size", "32", "48", "48", "--batch-size", "2",
               "--features", "8", "16", "32", "64", "--optimizer", "adam", "--lr", "3e-3", "--num-workers", "1",
               "--val-iterations", "2", "--supervised-warm-up", args.supervised_warm_up,
               "--absent-views", args.absent_views] \
        + (["--method", args.method] if args.method else [])
    return subprocess.Popen(command, env=env, stdout=open(folder / "train.log", "w"), stderr=subprocess.STDOUT)


def evaluate(folder: Path, trainer: str, raw: Path) -> dict:
    """Every prompt into one label map per test image; Dice of each dataset's own structure."""
    import torch
    from versemi.datasets.io import read_image, read_label
    from versemi.evaluation.metrics import dice
    from versemi.inference import load_models, predict_cases
    from versemi.model.plans_view import PlansView
    from versemi.model.checkpoint import load_checkpoint

    cached = folder / "evaluation.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    torch.set_num_threads(2)
    checkpoint = checkpoint_of(folder, trainer)
    ensemble = load_models([checkpoint])
    prompts = PlansView(ensemble.plans).real_prompts
    scores: dict[str, list[float]] = {}
    for dataset in DATASETS:
        output = folder / "predictions" / dataset
        written = predict_cases([raw / dataset / "imagesTs"], output, prompts, ensemble, mirroring=False,
                                overwrite=True, show_progress=False)
        table = json.loads((output / "labels.json").read_text(encoding="utf-8"))["labels"]
        for path in written:
            labels = read_image([path])[0][0]
            reference, _ = read_label(raw / dataset / "labelsTs" / path.name)
            for entry in table:
                mask = labels == entry["value"]
                if entry["dataset"] == dataset:
                    key = f"{entry['dataset']}/{entry['label']} Dice"
                    scores.setdefault(key, []).append(100 * dice(mask, reference == entry["label_value"]))
                else:  # a structure this dataset's images do not hold
                    key = f"{entry['dataset']}/{entry['label']} on {dataset} images, % of voxels"
                    scores.setdefault(key, []).append(100 * float(mask.mean()))
    history = load_checkpoint(checkpoint)["history"]
    result = {"scores": {k: float(np.mean(v)) for k, v in scores.items()},
              "iterations": sum(len(epoch) for epoch in history["iteration_losses"]),
              "train_seconds": float(sum(history["epoch_seconds"]))}
    cached.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", nargs="+", default=["MutualLearningTrainer", "VerSemiTrainer"])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--method", help="--method settings (JSON) given to every trainer of this run, "
                                         "e.g. an ablation in its own --work")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "_work" / "demo_budget")
    parser.add_argument("--supervised-warm-up", default="auto",
                        help="versemi_train --supervised-warm-up (auto: runs this short stay supervised; 0: the "
                             "method from the first step)")
    parser.add_argument("--known-absent", action="store_true",
                        help="plan with --known-absent all: each dataset declares the other's structure absent")
    parser.add_argument("--absent-views", choices=("on", "off"), default="on",
                        help="versemi_train --absent-views (with --known-absent: also learn the absence on the view "
                             "prediction shows the other structure's prompt)")
    args = parser.parse_args()
    work = args.work.absolute()
    raw = prepare(work, args.known_absent)
    results: dict[str, dict[int, dict]] = {t: {} for t in args.trainers}
    for seed in args.seeds:
        processes = [(t, start(args, work, t, seed)) for t in args.trainers]
        print(f"{time.strftime('%H:%M:%S')} seed {seed}: training {args.trainers} (load {os.getloadavg()[0]:.1f})",
              flush=True)
        for trainer, process in processes:
            if process is not None and process.wait() != 0:
                sys.exit(f"training failed: see {run_folder(work, trainer, seed) / 'train.log'}")
        for trainer in args.trainers:
            results[trainer][seed] = evaluate(run_folder(work, trainer, seed), trainer, raw)
            print(f"{time.strftime('%H:%M:%S')} {trainer} seed {seed}: {results[trainer][seed]}", flush=True)
    keys = list(next(iter(results[args.trainers[0]].values()))["scores"])
    header = ["trainer", "seeds", *keys, "iterations"]
    rows = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for trainer, by_seed in results.items():
        runs = list(by_seed.values())
        cells = [f"{np.mean([r['scores'][k] for r in runs]):.2f} ± {np.std([r['scores'][k] for r in runs]):.2f}"
                 for k in keys]
        rows.append(f"| {trainer} | {','.join(map(str, by_seed))} | {' | '.join(cells)} | "
                    f"{np.mean([r['iterations'] for r in runs]):.0f} |")
    title = (f"Demo pair (DemoLA + DemoPancreas, synthetic), fold 0, --time-budget {args.minutes:g} min, 2 runs side "
             "by side x 1 thread; patch 32x48x48, features 8-16-32-64, batch 2, adam 3e-3; final checkpoint; every "
             "prompt into one label map, no mirroring"
             + (f"; planned with --known-absent all, --absent-views {args.absent_views}" if args.known_absent
                else "; nothing declared absent")
             + f"; --supervised-warm-up {args.supervised_warm_up}")
    (work / "demo_budget.md").write_text(title + "\n\n" + "\n".join(rows) + "\n")
    (work / "demo_budget.json").write_text(json.dumps({"settings": vars(args) | {"work": str(work)},
                                                       "results": results}, indent=2, default=str))
    print(title)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
