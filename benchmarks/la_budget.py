"""Equal-budget comparison of trainers on real LA scans (the development split).

Data: the 80 cases of ``../shared/data/la2018_h5``. The first 8 ids of train.list are labeled,
the next 52 are used without labels, the last 20 are a development test set that no training or
selection ever sees. Every run trains fold ``all`` with the same ``--time-budget``, plan,
patch, network and optimizer, and its final checkpoint is used. Test cases are predicted in their
own geometry (0.625 mm) by the pipeline's predictor and scored in voxel units (Dice, Jaccard,
HD95, ASD; MedPy conventions).

    python benchmarks/la_budget.py                      # every trainer, 20 min, seeds 0 1 (about 2 h)
    python benchmarks/la_budget.py --minutes 20 --seeds 0 1 \\
        --variant '{"label": "VerSemi paper", "trainer": "VerSemiTrainer", "method": {"preset": "paper"}}'
    # fp32 at the iterations the bf16 default reached in 20 minutes (accuracy of the precision, not its speed)
    python benchmarks/la_budget.py --work W --seeds 0 --variant '{"label": "Supervised", "trainer": "SupervisedTrainer"}' \\
        --variant '{"label": "Supervised fp32", "trainer": "SupervisedTrainer", "args": ["--precision", "fp32"],
                    "same_iterations_as": "Supervised"}' --parallel 1

Runs go ``--parallel`` at a time (default 2, one thread each), in seed order, so compared runs
share the machine side by side; each group is evaluated after it finished training. Finished runs
and evaluations are reused, so adding a variant retrains nothing else. Writes
``<work>/la_budget.json``, ``la_budget.md`` (the table) and ``la_budget.png``. Not a test.
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

import budget_runs

REPO = Path(__file__).resolve().parents[1]
H5 = REPO.parent / "shared" / "data" / "la2018_h5"
BIN = budget_runs.BIN
EXPERIMENT = "LA8_dev"
LABELED = 8  # the first ids of train.list
METRICS = ("dice", "jaccard", "hd95", "asd")
# in this order, two side by side, the pairs are (BCP, M3HL), (CAD, Supervised), (VerSemi, BCP) ...
DEFAULT_VARIANTS = [{"label": "BCP", "trainer": "BCPTrainer"}, {"label": "M3HL", "trainer": "M3HLTrainer"},
                    {"label": "CAD", "trainer": "CADTrainer"}, {"label": "Supervised", "trainer": "SupervisedTrainer"},
                    {"label": "VerSemi", "trainer": "VerSemiTrainer"},
                    # the two-network methods with a second U-Net: the V-Net needs sides that are multiples of 16;
                    # C3S3 with one view, since two views get a quarter of the iterations on a CPU (RESULTS.md)
                    {"label": "MutualLearning", "trainer": "MutualLearningTrainer"},
                    {"label": "MEDL (U-Net pair)", "trainer": "MEDLTrainer", "method": {"second_architecture": "unet"}},
                    {"label": "C3S3 (U-Net pair, one view)", "trainer": "C3S3Trainer",
                     "method": {"second_architecture": "unet", "two_views": False}}]


def read_ids(source: Path) -> list[str]:
    return [line.strip() for line in (source / "train.list").read_text(encoding="utf-8").splitlines() if line.strip()]


def split_description(source: Path, test_cases: int) -> str:
    ids = read_ids(source)
    return f"{LABELED} labeled / {len(ids) - LABELED - test_cases} unlabeled / {test_cases} test"


def prepare_data(work: Path, spacing_scale: float, source: Path = H5, test_cases: int = 20) -> Path:
    """Convert the development split (the last ``test_cases`` ids held out) and plan + preprocess it;
    returns raw/LA."""
    from versemi.benchmark_protocol import convert_split, split_source
    from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess
    from versemi.plans.planner import PlanSettings

    with budget_runs.preparing(work):
        ids = read_ids(source)
        if len(ids) <= LABELED + test_cases:
            sys.exit(f"{source / 'train.list'}: {len(ids)} ids, too few for {LABELED} labeled cases and "
                     f"{test_cases} test cases; list more ids or lower --test-cases")
        test_file = work / "test_ids.txt"
        test_file.write_text("\n".join(ids[-test_cases:]) + "\n")
        train, test = split_source(source, test_file)
        assert train == ids[:-test_cases] and test == ids[-test_cases:]
        raw = work / "raw" / "LA"
        raw.parent.mkdir(parents=True, exist_ok=True)
        convert_split(source, raw, train, test, show_progress=False)
        plan_and_preprocess(ExperimentRequest(["LA"], work / "raw", work / "versemi_plans", experiment=EXPERIMENT,
                                              labeled_limits={"LA": LABELED}, num_processes=2,
                                              settings=PlanSettings(spacing_scale=spacing_scale), show_progress=False))
        return raw


def run_folder(work: Path, variant: dict, seed: int) -> Path:
    return work / "runs" / variant["label"].replace(" ", "_") / f"seed{seed}"


def reference_schedule(work: Path, label: str, seed: int) -> list[str]:
    """``--epochs E --iterations-per-epoch I`` of the finished run ``label`` with this seed (equal iterations)."""
    from versemi.model.checkpoint import load_checkpoint

    pointer = run_folder(work, {"label": label}, seed) / "checkpoint.txt"
    if not pointer.is_file():
        sys.exit(f"{pointer}: no finished run '{label}' with seed {seed} to take the number of iterations from; "
                 f"run that variant first (it must come earlier in --variant or already be in {work})")
    config = load_checkpoint(Path(pointer.read_text(encoding="utf-8")))["config"]
    return ["--epochs", str(config["epochs"]), "--iterations-per-epoch", str(config["iterations_per_epoch"])]


def train_command(args, variant: dict, seed: int, work: Path) -> list[str]:
    # equal iterations instead of equal time: e.g. fp32 against the bf16 default at the same number of steps
    schedule = (reference_schedule(work, variant["same_iterations_as"], seed) if variant.get("same_iterations_as")
                else ["--time-budget", str(args.minutes)])
    command = [str(BIN / "versemi_train"), "3d_fullres", "all", "-e", EXPERIMENT, "-tr", variant["trainer"],
               *schedule, "--seed", str(seed), "--num-workers", str(args.num_workers),
               "--optimizer", args.optimizer, "--lr", str(args.lr), "--device", args.device]
    if not args.plan_network:
        command += ["--patch-size", *map(str, args.patch), "--batch-size", str(args.batch_size),
                    "--features", *map(str, args.features)]
    if args.compile:
        command.append("--compile")
    if variant.get("method"):
        command += ["--method", json.dumps(variant["method"])]
    return command + list(variant.get("args", []))


def start_training(args, work: Path, variant: dict, seed: int) -> subprocess.Popen | None:
    return budget_runs.start_training(train_command(args, variant, seed, work), run_folder(work, variant, seed), EXPERIMENT,
                                      variant["trainer"], work / "versemi_plans", args.threads)


def evaluate_run(folder: Path, raw: Path, mirroring: bool, device: str = "cpu") -> dict:
    """Predict the test cases at their own resolution and score them in voxel units (cached)."""
    import torch
    from versemi.evaluation import evaluate_folders
    from versemi.model.checkpoint import load_checkpoint

    result_file = folder / "evaluation.json"
    checkpoint = Path((folder / "checkpoint.txt").read_text(encoding="utf-8"))
    if result_file.is_file():
        return {**json.loads(result_file.read_text(encoding="utf-8")),
                "wall_seconds": budget_runs.training_wall_seconds(folder, checkpoint)}
    torch.set_num_threads(2)
    predict_seconds = budget_runs.predict_test_cases(checkpoint, raw, folder / "predictions", mirroring, device)
    summary = evaluate_folders(raw / "labelsTs", folder / "predictions", voxel_units=True, labels=[1],
                               output_dir=folder / "evaluation")
    result = {"mean": summary["mean"]["1"], "cases": {r["case"]: r["metrics"]["1"]["dice"] for r in summary["cases"]},
              **budget_runs.training_record(folder, load_checkpoint(checkpoint)), "predict_seconds": predict_seconds}
    result_file.write_text(json.dumps(result, indent=2))
    return result


def table(results: dict, minutes: float) -> list[str]:
    """Markdown rows: mean +- std over seeds per variant."""
    rows = ["| trainer | seeds | Dice % | Jaccard % | HD95 (vox) | ASD (vox) | iterations | s/it | wall / budget "
            "| data wait s | peak GPU GiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, runs in results.items():
        def stat(values, scale=1.0, digits=2):
            values = np.array([v for v in values if v is not None], float) * scale
            return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}" if values.size else "n/a"
        seeds = sorted(runs)
        cells = [stat([runs[s]["mean"][m] for s in seeds], 100 if m in ("dice", "jaccard") else 1) for m in METRICS]
        cells += [stat([runs[s]["iterations"] for s in seeds], digits=0),
                  stat([runs[s]["seconds_per_iteration"] for s in seeds]),
                  stat([runs[s]["wall_seconds"] / (60 * minutes) for s in seeds]),
                  stat([runs[s].get("data_wait_seconds") for s in seeds], digits=0),
                  stat([runs[s].get("peak_gpu_memory_gib") for s in seeds])]
        rows.append(f"| {label} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return rows


def figure(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    fig, (ax_dice, ax_its) = plt.subplots(1, 2, figsize=(4 + 2.2 * len(labels), 4.5))
    for i, label in enumerate(labels):
        dices = [100 * r["mean"]["dice"] for r in results[label].values()]
        ax_dice.bar(i, np.mean(dices), yerr=np.std(dices), color="C0", alpha=0.6, capsize=4)
        ax_dice.plot([i] * len(dices), dices, "ko", ms=4)
        ax_its.bar(i, np.mean([r["iterations"] for r in results[label].values()]), color="C1", alpha=0.6)
    for ax, title in ((ax_dice, "test Dice % (mean ± std over seeds, dots = seeds)"), (ax_its, "iterations reached")):
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
        ax.set_title(title, fontsize=9)
    low = min(100 * r["mean"]["dice"] for runs in results.values() for r in runs.values())
    ax_dice.set_ylim(max(0, low - 5), 100)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="--time-budget of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variant", action="append", type=json.loads,
                        help='JSON {"label", "trainer", "method": {...}, "args": [...], "same_iterations_as": LABEL} '
                             '(repeatable; default: every trainer). same_iterations_as trains the epochs x iterations '
                             'of that variant\'s run with the same seed instead of --minutes')
    parser.add_argument("--parallel", type=int, default=2, help="runs trained side by side")
    parser.add_argument("--threads", type=int, default=1, help="threads per run")
    parser.add_argument("--spacing-scale", type=float, default=2.0)
    parser.add_argument("--patch", type=int, nargs=3, default=[40, 64, 80])
    parser.add_argument("--features", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--mirroring", action="store_true", help="mirroring at test time (8x slower on a CPU)")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "_work" / "la_budget")
    parser.add_argument("--data", type=Path, default=H5, help="the UA-MT LA folder (<ID>/mri_norm2.h5, train.list)")
    parser.add_argument("--test-cases", type=int, default=20,
                        help="the last ids of train.list held out as test cases (20: the development split; fewer "
                             "with a shortened train.list, e.g. a subset carried to a GPU machine)")
    parser.add_argument("--name", default="la_budget", help="stem of the table, JSON and figure written in --work")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA)")
    parser.add_argument("--num-workers", type=int, default=1, help="loader processes per stream and run")
    parser.add_argument("--plan-network", action="store_true",
                        help="train with the plan's own patch, batch and network instead of --patch/--features")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"real LA data not found at {args.data}: this benchmark needs ../shared beside the checkout, "
                 "or --data")
    variants = args.variant or DEFAULT_VARIANTS
    work = args.work.absolute()
    raw = prepare_data(work, args.spacing_scale, args.data.absolute(), args.test_cases)
    jobs = [(v, s) for s in args.seeds for v in variants]
    results: dict[str, dict[int, dict]] = {v["label"]: {} for v in variants}
    for group_start in range(0, len(jobs), args.parallel):
        group = jobs[group_start:group_start + args.parallel]
        started = [(v, s, start_training(args, work, v, s)) for v, s in group]
        print(f"{time.strftime('%H:%M:%S')} training {[(v['label'], s) for v, s in group]} "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
        for variant, seed, process in started:
            if process is not None:
                budget_runs.finish_training(process)
        for variant, seed in group:
            result = evaluate_run(run_folder(work, variant, seed), raw, args.mirroring, args.device)
            results[variant["label"]][seed] = result
            print(f"{time.strftime('%H:%M:%S')} {variant['label']} seed {seed}: Dice {100 * result['mean']['dice']:.2f}, "
                  f"{result['iterations']} iterations, {result['seconds_per_iteration']:.2f} s/it, wall "
                  f"{result['wall_seconds'] / 60:.1f} min (load {result['load'][0]:.1f} -> {result['load'][1]:.1f})",
                  flush=True)
    rows = table(results, args.minutes)
    header = (f"LA development split ({split_description(args.data, args.test_cases)}), --time-budget {args.minutes:g} min, "
              f"{args.parallel} runs side by side x {args.threads} thread(s); spacing x{args.spacing_scale:g}, patch "
              f"{args.patch}, features {args.features}, batch {args.batch_size}, {args.optimizer} lr {args.lr:g}; "
              f"final checkpoint; test mirroring {'on' if args.mirroring else 'off'}")
    (work / f"{args.name}.md").write_text(header + "\n\n" + "\n".join(rows) + "\n")
    (work / f"{args.name}.json").write_text(json.dumps({"settings": vars(args) | {"work": str(work)}, "results": results},
                                                       indent=2, default=str))
    figure(results, work / f"{args.name}.png")
    print(header)
    print("\n".join(rows))
    print(f"wrote {work / (args.name + '.md')}, {work / (args.name + '.png')}")


if __name__ == "__main__":
    main()
