"""LA and hippocampus in one model, against each dataset trained alone (equal time per run).

Data: the development splits of the two real datasets, unchanged. LA (``../shared/data/la2018_h5``):
8 labeled, 52 unlabeled, 20 test, planned at twice its spacing (1.25 mm) for a CPU. Hippocampus
(``../shared/data/Task04_Hippocampus``): 10 labeled, 150 unlabeled, 40 test, at its own 1 mm.
Test cases never reach training, checkpoints or settings.

Experiments (one raw root, one plans root in ``--work``):
- ``joint``: both datasets, ``--known-absent all`` (no atrium in a hippocampus crop, no hippocampus
  in an atrium MRI), so the trainers learn the other dataset's structures absent;
- ``joint_unknown``: both datasets, nothing declared (the other dataset's structures stay unknown);
- ``joint_own``: as ``joint``, planned with ``--patch-per-dataset`` (the hippocampus gets a patch
  of its own, 40 x 64 x 48 instead of LA's 48 x 80 x 96, and each step trains a sub-batch of each
  dataset);
- ``LA`` and ``Hippocampus`` alone.

Rows (``--rows`` picks some by label; every run trains fold ``all`` with ``--time-budget`` and the
plan's CPU preset, final checkpoint): the joint trainers at ``--minutes``; SupervisedTrainer and
VerSemiTrainer on each dataset alone at half of it (the same total budget, split between the two
datasets) and at all of it (the same budget each). Each dataset's test cases are predicted with
every prompt of the model into one label map (``versemi_predict -p all``, no mirroring) and scored
on the dataset's own structures (Dice %, HD95 and ASD in mm), and the share of their voxels given
to the other dataset's structures is the cross-dataset claim (``versemi_evaluate``'s
``foreign_claims``).

    python benchmarks/joint_pair.py --work WORK --minutes 40 --seeds 0 1
    python benchmarks/joint_pair.py --work WORK --minutes 40 --seeds 0 --rows "joint VerSemi" "LA Supervised half"

Runs go two side by side (one thread each); finished runs and evaluations are reused, a killed run
is continued, so the table grows run by run. Writes ``<work>/joint_pair_<minutes>min.md``, ``.json``
and ``.png``. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

import budget_runs
import hippocampus_converged as hippocampus
import la_budget

REPO = Path(__file__).resolve().parents[1]
LABELED = {"LA": 8, "Hippocampus": hippocampus.LABELED}
SPACING_SCALE = {"LA": 2.0}  # LA coarsened for a CPU; the hippocampus keeps its 1 mm
EXPERIMENTS = {"joint": ["LA", "Hippocampus"], "joint_unknown": ["LA", "Hippocampus"],
               "joint_own": ["LA", "Hippocampus"], "LA": ["LA"], "Hippocampus": ["Hippocampus"]}
# experiments declaring every other dataset's structures absent, and their names' suffixes
DECLARED = {"joint": "_absent", "joint_own": "_absent_own_patch"}
ADAM = ("--optimizer", "adam", "--lr", "0.003")
STRUCTURES = {"LA": {1: "left atrium"}, "Hippocampus": {1: "anterior", 2: "posterior"}}


class Row(NamedTuple):
    label: str
    experiment: str
    trainer: str
    budget_share: float  # of --minutes
    flags: tuple[str, ...] = ()  # further versemi_train flags


ROWS = [Row("joint VerSemi", "joint", "VerSemiTrainer", 1.0),
        # the patch ablation: the hippocampus at a patch of its own (one dataset per step), at equal optimizer
        Row("joint VerSemi, Adam", "joint", "VerSemiTrainer", 1.0, ADAM),
        Row("joint VerSemi, own patches, Adam", "joint_own", "VerSemiTrainer", 1.0, ADAM),
        # the absences learnt on the own views only (as before --absent-views existed)
        Row("joint VerSemi, own patches, Adam, views off", "joint_own", "VerSemiTrainer", 1.0,
            ADAM + ("--absent-views", "off")),
        Row("joint MutualLearning", "joint", "MutualLearningTrainer", 1.0),
        Row("joint VerSemi, nothing declared", "joint_unknown", "VerSemiTrainer", 1.0),
        *(Row(f"{dataset} {name} {share_name}", dataset, f"{name}Trainer", share)
          for name in ("Supervised", "VerSemi") for dataset in ("LA", "Hippocampus")
          for share_name, share in (("half", 0.5), ("full", 1.0)))]


def experiment_name(key: str) -> str:
    names = "_".join(f"{d}{LABELED[d]}" for d in EXPERIMENTS[key])
    return f"{names}_dev" + DECLARED.get(key, "")


def prepare(work: Path, la_source: Path, hippocampus_source: Path, experiments: list[str]) -> Path:
    """Convert both splits into ``work/raw`` (test cases held out) and plan ``experiments``."""
    from versemi.benchmark_protocol import convert_split, split_source
    from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess
    from versemi.plans.planner import PlanSettings

    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    ids = [line.strip() for line in (la_source / "train.list").read_text(encoding="utf-8").splitlines() if line.strip()]
    (work / "la_test_ids.txt").write_text("\n".join(ids[60:]) + "\n")
    train, test = split_source(la_source, work / "la_test_ids.txt")
    convert_split(la_source, raw / "LA", train, test, show_progress=False)
    split = hippocampus.split_ids(hippocampus_source)
    convert_split(hippocampus_source, raw / "Hippocampus", split["labeled"] + split["unlabeled"], split["test"],
                  show_progress=False, kind="msd")
    for key in experiments:
        datasets = EXPERIMENTS[key]
        plan_and_preprocess(ExperimentRequest(datasets, raw, work / "versemi_plans", experiment=experiment_name(key),
                                              labeled_limits={d: LABELED[d] for d in datasets}, num_processes=2,
                                              settings=PlanSettings(spacing_scale={d: SPACING_SCALE[d] for d in
                                                                                   datasets if d in SPACING_SCALE},
                                                                    patch_per_dataset=key == "joint_own"),
                                              known_absent="all" if key in DECLARED else None, show_progress=False))
    return raw


def run_folder(work: Path, row: Row, minutes: float, seed: int) -> Path:
    return work / "runs" / row.label.replace(" ", "_").replace(",", "") / f"{minutes * row.budget_share:g}min_seed{seed}"


def start(work: Path, row: Row, minutes: float, seed: int):
    experiment = experiment_name(row.experiment)
    command = [str(budget_runs.BIN / "versemi_train"), "3d_fullres", "all", "-e", experiment, "-tr", row.trainer,
               "--time-budget", f"{minutes * row.budget_share:g}", "--seed", str(seed), "--num-workers", "1",
               "--device", "cpu", *row.flags]
    return budget_runs.start_training(command, run_folder(work, row, minutes, seed), experiment, row.trainer,
                                      work / "versemi_plans", threads=1)


def evaluate(folder: Path, row: Row, raw: Path) -> dict:
    """Each dataset of the row's experiment: every prompt into one label map per test case, scored on
    the dataset's own structures; the other dataset's structures as claimed voxels (cached)."""
    import torch
    from versemi.evaluation import evaluate_folders
    from versemi.inference import load_models, predict_cases
    from versemi.inference.prompt_names import resolve_prompts
    from versemi.model.checkpoint import load_checkpoint

    cached = folder / "evaluation.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    torch.set_num_threads(1)
    checkpoint = Path((folder / "checkpoint.txt").read_text(encoding="utf-8"))
    ensemble = load_models([checkpoint])
    prompts = resolve_prompts(ensemble.plans, None)
    result: dict = {"datasets": {}}
    for dataset in EXPERIMENTS[row.experiment]:
        output = folder / "predictions" / dataset
        predict_cases([raw / dataset / "imagesTs"], output, prompts if len(prompts) > 1 else prompts[0], ensemble,
                      mirroring=False, overwrite=True, show_progress=False)
        summary = evaluate_folders(raw / dataset / "labelsTs", output, labels=list(STRUCTURES[dataset]),
                                   output_dir=folder / "evaluation" / dataset, dataset=dataset)
        claims = summary["foreign_claims"]
        result["datasets"][dataset] = {
            "per_label": {str(v): summary["mean"][str(v)] for v in STRUCTURES[dataset]},
            "claims_percent": ({name: 100 * figures["mean"] for name, figures in claims["structures"].items()}
                               if claims else None)}
    result.update(budget_runs.training_record(folder, load_checkpoint(checkpoint)))
    cached.write_text(json.dumps(result, indent=2))
    return result


def method_iterations(record: dict, row: Row) -> int | None:
    """Iterations after the shared supervised warm-up (0: the method never started, the run trained
    supervised throughout); None for a supervised row."""
    budget = record.get("budget") or {}
    if row.trainer == "SupervisedTrainer" or budget.get("supervised_warm_up_epochs") is None:
        return None
    return (budget["epochs"] - budget["supervised_warm_up_epochs"]) * budget["iterations_per_epoch"]


def cell(values: list, digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}" if values else "n/a"


def table(results: dict[str, dict[int, dict]], rows: list[Row], minutes: float) -> list[str]:
    head = ["row", "minutes", "seeds", "LA Dice %", "Hippocampus Dice % (mean of 2)", "anterior", "posterior",
            "LA HD95 mm", "Hippocampus HD95 mm", "hippocampus claimed in LA scans, % voxels",
            "atrium claimed in hippocampus scans, % voxels", "iterations", "of them the method's"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        runs = list(results.get(row.label, {}).values())
        if not runs:
            continue

        def label_metric(dataset, label, metric, scale=1.0):
            values = [r["datasets"][dataset]["per_label"][str(label)][metric] for r in runs if dataset in r["datasets"]]
            return [None if v is None else v * scale for v in values]  # None: no surface (HD95 of an empty mask)

        def claimed(dataset):
            return [sum(r["datasets"][dataset]["claims_percent"].values()) for r in runs
                    if dataset in r["datasets"] and r["datasets"][dataset]["claims_percent"] is not None]

        def both_labels(metric, scale=1.0):
            pairs = zip(label_metric("Hippocampus", 1, metric, scale), label_metric("Hippocampus", 2, metric, scale))
            return [None if None in pair else np.mean(pair) for pair in pairs]

        hippo, hippo_hd = both_labels("dice", 100), both_labels("hd95")
        lines.append("| " + " | ".join([
            row.label, f"{minutes * row.budget_share:g}", ",".join(map(str, sorted(results[row.label]))),
            cell(label_metric("LA", 1, "dice", 100)), cell(hippo), cell(label_metric("Hippocampus", 1, "dice", 100)),
            cell(label_metric("Hippocampus", 2, "dice", 100)), cell(label_metric("LA", 1, "hd95")), cell(hippo_hd),
            cell(claimed("LA"), 3), cell(claimed("Hippocampus"), 3),
            cell([r["iterations"] for r in runs], 0), cell([method_iterations(r, row) for r in runs], 0)]) + " |")
    return lines


def figure(results: dict[str, dict[int, dict]], rows: list[Row], path: Path) -> None:
    """Each dataset's test Dice per row, and the cross-dataset claims against the 0.5 % target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [row for row in rows if results.get(row.label)]
    fig, axes = plt.subplots(1, 3, figsize=(6 + 1.8 * len(shown), 4.5))
    for ax, dataset, labels in ((axes[0], "LA", (1,)), (axes[1], "Hippocampus", (1, 2))):
        for i, row in enumerate(shown):
            dices = [100 * np.mean([r["datasets"][dataset]["per_label"][str(v)]["dice"] for v in labels])
                     for r in results[row.label].values() if dataset in r["datasets"]]
            if dices:
                ax.bar(i, np.mean(dices), color="C0" if row.experiment.startswith("joint") else "C1", alpha=0.6)
                ax.plot([i] * len(dices), dices, "ko", ms=4)
        ax.set_xticks(range(len(shown)), [row.label for row in shown], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{dataset} test Dice % (dots: seeds;\nblue: joint model)", fontsize=9)
    claims = axes[2]
    for offset, dataset, name in ((-0.2, "LA", "hippocampus claimed in LA scans"),
                                  (0.2, "Hippocampus", "atrium claimed in hippocampus scans")):
        for i, row in enumerate(shown):
            values = [sum(r["datasets"][dataset]["claims_percent"].values()) for r in results[row.label].values()
                      if dataset in r["datasets"] and r["datasets"][dataset]["claims_percent"] is not None]
            if values:
                claims.bar(i + offset, np.mean(values), width=0.4, color="C2" if offset < 0 else "C3", alpha=0.6,
                           label=name if i == 0 else None)
                claims.plot([i + offset] * len(values), values, "ko", ms=4)
    claims.axhline(0.5, color="k", ls="--", lw=1, label="target 0.5 %")
    claims.set_xticks(range(len(shown)), [row.label for row in shown], rotation=30, ha="right", fontsize=7)
    claims.set_title("cross-dataset claims,\n% of a scan's voxels", fontsize=9)
    claims.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=40.0, help="the joint runs' --time-budget")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rows", nargs="+", help=f"row labels (default: all): {', '.join(r.label for r in ROWS)}")
    parser.add_argument("--parallel", type=int, default=2, help="runs trained side by side, one thread each")
    parser.add_argument("--la", type=Path, default=la_budget.H5)
    parser.add_argument("--hippocampus", type=Path, default=hippocampus.SOURCE)
    parser.add_argument("--report", action="store_true", help="train nothing: the table of every finished run")
    args = parser.parse_args()
    for source in (args.la, args.hippocampus):
        if not source.is_dir():
            sys.exit(f"real data not found at {source}: this benchmark needs ../shared beside the checkout")
    unknown = set(args.rows or []) - {r.label for r in ROWS}
    if unknown:
        sys.exit(f"unknown row(s) {sorted(unknown)}; rows: {[r.label for r in ROWS]}")
    rows = [r for r in ROWS if not args.rows or r.label in args.rows]
    work = args.work.absolute()
    raw = prepare(work, args.la.absolute(), args.hippocampus.absolute(), list(dict.fromkeys(r.experiment for r in rows)))
    results: dict[str, dict[int, dict]] = {row.label: {} for row in rows}
    jobs = [(row, seed) for seed in args.seeds for row in rows]
    if args.report:
        jobs = [(row, seed) for row, seed in jobs if (run_folder(work, row, args.minutes, seed) / "checkpoint.txt").is_file()]
    for first in range(0, len(jobs), args.parallel):
        group = jobs[first:first + args.parallel]
        started = [] if args.report else [start(work, row, args.minutes, seed) for row, seed in group]
        print(f"{time.strftime('%H:%M:%S')} {[(row.label, seed) for row, seed in group]} "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
        for process in started:
            if process is not None:
                budget_runs.finish_training(process)
        for row, seed in group:
            results[row.label][seed] = evaluate(run_folder(work, row, args.minutes, seed), row, raw)
    lines = table(results, rows, args.minutes)
    stem = work / f"joint_pair_{args.minutes:g}min"
    header = (f"LA (8 labeled / 52 unlabeled / 20 test, 1.25 mm) and hippocampus (10 / 150 / 40, 1 mm); fold all, "
              f"plan's CPU preset, {args.parallel} runs side by side x 1 thread, final checkpoint, every prompt into "
              "one label map, no mirroring; claims: share of a scan's voxels given to the other dataset's structures")
    stem.with_suffix(".md").write_text(header + "\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
    stem.with_suffix(".json").write_text(json.dumps({"settings": vars(args) | {"work": str(work)}, "results": results},
                                                    indent=2, default=str), encoding="utf-8")
    figure(results, rows, stem.with_suffix(".png"))
    print(header)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
