"""Supervised learning curve on real hippocampus MRI: test Dice against the training time budget.

It finds where supervised training converges on a CPU: the place to ask whether unlabeled scans help.

Data: the 200 cases of ``../shared/data/Task04_Hippocampus`` (MSD Task04, labels 1 Anterior and
2 Posterior). Development split, in sorted case-id order: the first 10 are labeled, the next 150
are used without labels, the last 40 are a development test set (imagesTs/labelsTs) that no
training or selection ever sees. The 160 training cases are converted in that order and planned
with ``--labeled Hippocampus=10``; the split is written to ``<work>/split.json``.

    python benchmarks/hippocampus_converged.py curve --work WORK --budgets 5 10 20 40 --seeds 0

``curve``: SupervisedTrainer, fold ``all``, ``--time-budget`` each of ``--budgets`` minutes (one
run per budget and seed, one after the other, ``--threads`` each), the plan's network, patch and
batch unless ``--patch``/``--batch-size``/``--features`` override them, final checkpoint. The 40
test cases are predicted by the pipeline's predictor in their own geometry (1 mm; test-time
mirroring only with ``--mirroring``, 8x slower on a CPU) and scored per label (Dice, HD95 and ASD in mm, MedPy conventions); the table shows means over both labels. The
plateau budget is the first budget whose doubling adds less than 0.5 Dice points. Writes
``<work>/hippocampus_curve.json``, ``.md`` and ``.png`` (Dice against budget, log2 axis), with the
CPU model, bf16 units, precision, threads and the load average at the start and end of each run.

``compare``: ``--trainers`` at one ``--budget`` per run, each of ``--seeds``, on the same split,
network and scoring. From scratch (the default: semi-supervised trainers get the shared supervised
warm-up, ``--supervised-warm-up auto``), or, with ``--from-budget F``, each continuing from the
curve's SupervisedTrainer checkpoint of ``F`` minutes and seed ``--from-seed`` (``versemi_train
--init-from``) for the same added budget, SupervisedTrainer continuing as the reference:

    python benchmarks/hippocampus_converged.py compare --work WORK --budget 20 --from-budget 20 \
        --trainers SupervisedTrainer MeanTeacherTrainer VerSemiTrainer --seeds 0 1

Writes ``<work>/hippocampus_compare_<scratch|fromFmin>_<budget>min.md``, ``.json`` and ``.png``:
mean ± std over seeds per trainer, its difference to SupervisedTrainer's mean, and how many test
cases it improves. Two commands side by side (one seed each) write the same files; ``--report``
trains nothing and rewrites them from every finished run of the listed trainers and seeds (in
``curve``, of the listed budgets and seeds).

Ablations: a ``--trainers`` entry may carry settings, ``MeanTeacherTrainer:weight_consistency=1`` (a
``--method`` setting, JSON value) or ``BCPTrainer:--unlabeled-batch-size=2`` (a versemi_train flag);
its runs live in their own folder (``MeanTeacher_weight_consistency=1_from40min``).

The ceiling: ``curve --all-labeled --budgets 40`` trains SupervisedTrainer with all 160 training
cases labeled (experiment ``Hippocampus160_dev``, ``runs/AllLabeled``); ``AllLabeled`` in
``compare --trainers`` continues it from its own ``--from-budget`` checkpoint like the others, and
the table then shows each row's share of the gap from SupervisedTrainer to it.

``--configuration 2d`` trains and predicts nnU-Net's 2d configuration (slices; the plan's 2d
network unless overridden) instead of 3d_fullres: its runs, tables and figures carry ``_2d``
(``runs/Supervised_2d``, ``hippocampus_compare_scratch_20min_2d.md``).

Runs live in ``<work>/runs/<label>/<budget>min_seed<seed>`` (continuations in
``<label>_from<F>min``): a finished run and its evaluation are reused, a killed run is continued
(``--continue``), so rerunning the same command finishes what is missing and the table grows
(SupervisedTrainer from scratch is the curve's run). Not a test.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

import budget_runs

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "Task04_Hippocampus"
DATASET = "Hippocampus"
LABELED, UNLABELED, TEST = 10, 150, 40
EXPERIMENT = f"{DATASET}{LABELED}_dev"
ALL_LABELED = "AllLabeled"  # SupervisedTrainer with the unlabeled cases' labels too: the ceiling
EXPERIMENT_ALL_LABELED = f"{DATASET}{LABELED + UNLABELED}_dev"
LABELS = (1, 2)
PLATEAU_GAIN = 0.5  # Dice points a doubled budget must add to count as still learning
METRICS = ("dice", "hd95", "asd")


def split_ids(source: Path) -> dict[str, list[str]]:
    """The development split of the task's training list, in sorted case-id order."""
    from versemi.atomic import read_json

    ids = sorted(Path(e["label"]).name.removesuffix(".nii.gz") for e in read_json(source / "dataset.json")["training"])
    if len(ids) != LABELED + UNLABELED + TEST:
        sys.exit(f"{source} lists {len(ids)} training cases; this split needs {LABELED + UNLABELED + TEST}")
    return {"labeled": ids[:LABELED], "unlabeled": ids[LABELED:LABELED + UNLABELED], "test": ids[LABELED + UNLABELED:]}


def prepare_data(work: Path, source: Path, all_labeled: bool = False, configuration: str = "3d_fullres") -> Path:
    """Write the split, convert (test cases held out with their labels), plan and preprocess; returns
    raw/Hippocampus. ``all_labeled``: also plan the ceiling's experiment, all 160 training cases labeled."""
    from versemi.benchmark_protocol import convert_split
    from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess

    with budget_runs.preparing(work):
        split = split_ids(source)
        split_file = work / "split.json"
        if split_file.is_file() and json.loads(split_file.read_text(encoding="utf-8")) != split:
            sys.exit(f"{split_file} holds another split: use another --work")
        split_file.write_text(json.dumps(split, indent=1) + "\n", encoding="utf-8")
        raw = work / "raw" / DATASET
        raw.parent.mkdir(parents=True, exist_ok=True)
        convert_split(source, raw, split["labeled"] + split["unlabeled"], split["test"], show_progress=False, kind="msd")
        plan_and_preprocess(ExperimentRequest([DATASET], work / "raw", work / "versemi_plans", experiment=EXPERIMENT,
                                              labeled_limits={DATASET: LABELED}, num_processes=1, show_progress=False,
                                              configurations=[configuration]))
        if all_labeled:
            plan_and_preprocess(ExperimentRequest([DATASET], work / "raw", work / "versemi_plans",
                                                  experiment=EXPERIMENT_ALL_LABELED,
                                                  labeled_limits={DATASET: LABELED + UNLABELED}, num_processes=1,
                                                  show_progress=False, configurations=[configuration]))
        return raw


def machine() -> dict:
    from versemi.model.precision import cpu_has_bf16

    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
             if line.startswith("model name")]
    return {"cpu": names[0] if names else "unknown", "cores": os.cpu_count(), "bf16_units": cpu_has_bf16()}


class RunSpec(NamedTuple):
    """One row of a comparison: a trainer class, its ``--method`` settings and extra training flags,
    and the experiment it trains on (the all-labeled ceiling has its own plan)."""
    trainer: str
    label: str
    method: dict
    flags: tuple[str, ...] = ()
    experiment: str = EXPERIMENT


def parse_spec(text: str) -> RunSpec:
    """A ``--trainers`` entry (``budget_runs.parse_trainer_options``); ``AllLabeled`` is
    SupervisedTrainer with all 160 training cases labeled: the ceiling."""
    if text == ALL_LABELED:
        return RunSpec("SupervisedTrainer", ALL_LABELED, {}, (), EXPERIMENT_ALL_LABELED)
    return RunSpec(*budget_runs.parse_trainer_options(text))


def train_command(args, trainer: str, budget: float, seed: int, init_from: Path | None = None,
                  spec: RunSpec | None = None) -> list[str]:
    experiment = EXPERIMENT if spec is None else spec.experiment
    command = [str(budget_runs.BIN / "versemi_train"), args.configuration, "all", "-e", experiment, "-tr", trainer,
               "--time-budget", f"{budget:g}", "--seed", str(seed), "--num-workers", str(args.num_workers),
               "--precision", args.precision, "--device", "cpu"]
    if init_from is not None:
        command += ["--init-from", str(init_from)]
    if spec is not None and spec.method:
        command += ["--method", json.dumps(spec.method, sort_keys=True)]
    if spec is not None:
        command += list(spec.flags)
    for flag, value in (("--patch-size", args.patch), ("--batch-size", args.batch_size), ("--features", args.features)):
        if value is not None:
            command += [flag, *map(str, value if isinstance(value, list) else [value])]
    return command


def evaluate_run(folder: Path, raw: Path, mirroring: bool) -> dict:
    """Predict the test cases in their own geometry and score both labels in mm (cached for the same
    test-time mirroring)."""
    import torch
    from versemi.evaluation import evaluate_folders
    from versemi.model.checkpoint import load_checkpoint
    from versemi.model.precision import autocast_dtype

    result_file = folder / "evaluation.json"
    if result_file.is_file():
        cached = json.loads(result_file.read_text(encoding="utf-8"))
        if cached["mirroring"] == mirroring:
            return cached
    checkpoint = Path((folder / "checkpoint.txt").read_text(encoding="utf-8"))
    torch.set_num_threads(1)
    predict_seconds = budget_runs.predict_test_cases(checkpoint, raw, folder / "predictions", mirroring)
    summary = evaluate_folders(raw / "labelsTs", folder / "predictions", voxel_units=False, labels=list(LABELS),
                               output_dir=folder / "evaluation")
    state = load_checkpoint(checkpoint)
    config = state["config"]
    dtype = autocast_dtype(config.get("precision", "auto"), config.get("amp", True), torch.device("cpu"))
    per_label = {str(label): summary["mean"][str(label)] for label in LABELS}
    result = {"mean": {m: _mean([per_label[str(label)][m] for label in LABELS]) for m in METRICS},
              "per_label": per_label, "counts": summary["counts"],
              "cases": {r["case"]: {label: r["metrics"][label]["dice"] for label in r["metrics"]} for r in summary["cases"]},
              **budget_runs.training_record(folder, state), "predict_seconds": predict_seconds,
              "precision": {"requested": config.get("precision"), "used": "fp32" if dtype is None else str(dtype)},
              "mirroring": mirroring}
    result_file.write_text(json.dumps(result, indent=2))
    return result


def _mean(values: list) -> float | None:
    """Mean over labels; None where a label has no defined value."""
    return None if any(v is None for v in values) else float(np.mean(values))


def plateau(results: dict[float, dict[int, dict]]) -> tuple[float | None, list[str]]:
    """The first budget whose doubling (both measured) adds less than PLATEAU_GAIN Dice points, and
    one line per measured doubling. A budget at Dice 0 has not started learning, so a flat doubling
    from there is no plateau; nor is a doubling that loses PLATEAU_GAIN or more (a failed run)."""
    dice = {b: 100 * np.mean([r["mean"]["dice"] for r in runs.values()]) for b, runs in results.items() if runs}
    lines, found = [], None
    for budget in sorted(dice):
        if 2 * budget in dice:
            gain = dice[2 * budget] - dice[budget]
            started, fell = dice[budget] > 0, gain <= -PLATEAU_GAIN
            lines.append(f"{budget:g} -> {2 * budget:g} min: {gain:+.2f} Dice points"
                         + ("" if started else f" (Dice 0 at {budget:g} min: not learning yet)")
                         + (f" (fell: the {2 * budget:g}-minute run failed, no plateau)" if fell else ""))
            if found is None and started and not fell and gain < PLATEAU_GAIN:
                found = budget
    return found, lines


def verdict(found: float | None, lines: list[str]) -> str:
    if found is not None:
        return (f"plateau at {found:g} min: doubling it to {2 * found:g} min adds less than {PLATEAU_GAIN} Dice "
                f"points ({'; '.join(lines)})")
    if not lines:
        return "no plateau verdict yet: no budget and its double have both been measured"
    return (f"no plateau yet: no measured doubling from a learning model adds less than {PLATEAU_GAIN} Dice points "
            f"({'; '.join(lines)})")


def table(results: dict[float, dict[int, dict]]) -> list[str]:
    rows = ["| budget min | seeds | Dice % (mean of 2 labels) | Dice anterior % | Dice posterior % | HD95 mm | ASD mm "
            "| iterations | s/it | wall / budget | load start -> end | precision |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for budget in sorted(b for b in results if results[b]):
        runs = results[budget]
        seeds = sorted(runs)

        def stat(values, scale=1.0, digits=2):
            values = np.array([v for v in values if v is not None], float) * scale
            if not values.size:
                return "n/a"
            return f"{values.mean():.{digits}f}" + (f" ± {values.std():.{digits}f}" if values.size > 1 else "")
        cells = [stat([runs[s]["mean"]["dice"] for s in seeds], 100)]
        cells += [stat([runs[s]["per_label"][str(label)]["dice"] for s in seeds], 100) for label in LABELS]
        cells += [stat([runs[s]["mean"][m] for s in seeds]) for m in ("hd95", "asd")]
        cells += [stat([runs[s]["iterations"] for s in seeds], digits=0),
                  stat([runs[s]["seconds_per_iteration"] for s in seeds]),
                  stat([runs[s]["wall_seconds"] / (60 * budget) for s in seeds]),
                  ", ".join(f"{runs[s]['load'][0]:.2f} -> {runs[s]['load'][1]:.2f}" for s in seeds),
                  ", ".join(sorted({runs[s]["precision"]["used"] for s in seeds}))]
        rows.append(f"| {budget:g} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return rows


def figure(results: dict[float, dict[int, dict]], path: Path, configuration: str = "3d_fullres") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(b for b in results if results[b])
    fig, ax = plt.subplots(figsize=(6, 4.5))
    means = [100 * np.mean([r["mean"]["dice"] for r in results[b].values()]) for b in budgets]
    ax.plot(budgets, means, "o-", color="C0", label="mean of both labels (line: mean over seeds)")
    for label, color, name in ((1, "C1", "anterior"), (2, "C2", "posterior")):
        ax.plot(budgets, [100 * np.mean([r["per_label"][str(label)]["dice"] for r in results[b].values()])
                          for b in budgets], "s--", color=color, ms=4, label=name)
    for b in budgets:
        seeds = [100 * r["mean"]["dice"] for r in results[b].values()]
        ax.plot([b] * len(seeds), seeds, "k.", ms=5)
    # at least 10 Dice points of axis, so a plateau's fraction of a point does not look like a slope
    low, high = ax.get_ylim()
    middle, half = (low + high) / 2, max((high - low) / 2, 5.0)
    ax.set_ylim(max(0.0, middle - half), min(100.0, middle + half))
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
    ax.set_xlabel("time budget (min, log2)")
    ax.set_ylabel("test Dice % (40 cases)")
    ax.set_title(f"SupervisedTrainer ({configuration}), {LABELED} labeled hippocampus cases", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def configuration_suffix(args) -> str:
    """Runs and tables of the 2d configuration carry ``_2d``; those of 3d_fullres nothing."""
    return "" if args.configuration == "3d_fullres" else f"_{args.configuration}"


def curve_name(args) -> str:
    return ("hippocampus_curve_all_labeled" if args.all_labeled else "hippocampus_curve") + configuration_suffix(args)


def write_outputs(args, work: Path, results: dict, host: dict) -> str:
    found, lines = plateau(results)
    text = verdict(found, lines)
    labeled = (f"all {LABELED + UNLABELED} training cases labeled (the ceiling)" if args.all_labeled else
               f"{LABELED} labeled / {UNLABELED} unlabeled")
    settings = (f"Hippocampus development split ({labeled} / {TEST} test, "
                f"{work / 'split.json'}); configuration {args.configuration}; SupervisedTrainer fold all, final checkpoint; network, patch and batch: "
                f"{'the plan' if args.patch is None and args.batch_size is None and args.features is None else 'overridden'}"
                f"; {args.threads} thread(s), {args.num_workers} loader worker(s), precision {args.precision}; test "
                f"mirroring {'on' if args.mirroring else 'off'}; CPU {host['cpu']} ({host['cores']} cores), bf16 units: "
                f"{'yes' if host['bf16_units'] else 'no'}")
    rows = table(results)
    name = curve_name(args)
    (work / f"{name}.md").write_text(settings + "\n\n" + "\n".join(rows) + "\n\n" + text + "\n",
                                               encoding="utf-8")
    (work / f"{name}.json").write_text(json.dumps(
        {"settings": vars(args) | {"work": str(work)}, "machine": host, "split": str(work / "split.json"),
         "results": {f"{b:g}": runs for b, runs in sorted(results.items()) if runs},
         "plateau_budget": found, "doublings": lines, "verdict": text}, indent=2, default=str), encoding="utf-8")
    figure(results, work / f"{name}.png", args.configuration)
    print(settings)
    print("\n".join(rows))
    print(text, flush=True)
    return text


def curve(args) -> None:
    work = args.work.absolute()
    raw = prepare_data(work, args.data.absolute(), args.all_labeled, args.configuration)
    host = machine()
    spec = parse_spec(ALL_LABELED) if args.all_labeled else None
    trainer = "SupervisedTrainer"
    label = (ALL_LABELED if args.all_labeled else "Supervised") + configuration_suffix(args)
    jobs = [(budget, seed) for seed in args.seeds for budget in args.budgets]
    folders = {job: work / "runs" / label / f"{job[0]:g}min_seed{job[1]}" for job in jobs}
    results: dict[float, dict[int, dict]] = {budget: {} for budget in args.budgets}
    for number, (budget, seed) in enumerate(jobs, 1):
        folder = folders[(budget, seed)]
        name = f"[{number}/{len(jobs)}] {label} {budget:g} min seed {seed}"
        if args.report and not (folder / "checkpoint.txt").is_file():
            print(f"{time.strftime('%H:%M:%S')} {name}: not run yet, left out (--report)", flush=True)
            continue
        process = budget_runs.start_training(train_command(args, trainer, budget, seed, spec=spec), folder,
                                             EXPERIMENT if spec is None else spec.experiment, trainer,
                                             work / "versemi_plans", args.threads, args.configuration)
        if process is None:
            print(f"{time.strftime('%H:%M:%S')} {name}: finished earlier, reused", flush=True)
        else:
            # ETA from the budgets alone: the setup, warm-up and prediction come on top
            left = sum(b for b, s in jobs[number - 1:] if not (folders[(b, s)] / "checkpoint.txt").is_file())
            print(f"{time.strftime('%H:%M:%S')} {name}: {'continuing' if process.resumed else 'training'} "
                  f"(load {process.load_before:.2f}), ends about {time.strftime('%H:%M', time.localtime(time.time() + 60 * budget))}"
                  f", the whole curve about {time.strftime('%H:%M', time.localtime(time.time() + 60 * left))}"
                  f"; log {folder / 'train.log'}", flush=True)
            budget_runs.finish_training(process)
        result = evaluate_run(folder, raw, args.mirroring)
        results[budget][seed] = result
        print(f"{time.strftime('%H:%M:%S')} {name}: Dice {100 * result['mean']['dice']:.2f} "
              f"(anterior {100 * result['per_label']['1']['dice']:.2f}, posterior "
              f"{100 * result['per_label']['2']['dice']:.2f}), {result['iterations']} iterations, "
              f"{result['seconds_per_iteration']:.2f} s/it, {result['precision']['used']}, load "
              f"{result['load'][0]:.2f} -> {result['load'][1]:.2f}", flush=True)
        write_outputs(args, work, results, host)
    print(f"wrote {work / curve_name(args)}.md, .json and .png")


def trainer_label(trainer: str) -> str:
    return trainer.removesuffix("Trainer")


def run_and_score(args, work: Path, raw: Path, spec: RunSpec, budget: float, seed: int, folder: Path, name: str,
                  init_from: Path | None = None) -> dict:
    """Train (or reuse) one run and score it on the test cases."""
    process = budget_runs.start_training(train_command(args, spec.trainer, budget, seed, init_from, spec), folder,
                                         spec.experiment, spec.trainer, work / "versemi_plans", args.threads,
                                         args.configuration)
    if process is None:
        print(f"{time.strftime('%H:%M:%S')} {name}: finished earlier, reused", flush=True)
    else:
        print(f"{time.strftime('%H:%M:%S')} {name}: {'continuing' if process.resumed else 'training'} "
              f"(load {process.load_before:.2f}), ends about "
              f"{time.strftime('%H:%M', time.localtime(time.time() + 60 * budget))}; log {folder / 'train.log'}",
              flush=True)
        budget_runs.finish_training(process)
    result = evaluate_run(folder, raw, args.mirroring)
    print(f"{time.strftime('%H:%M:%S')} {name}: Dice {100 * result['mean']['dice']:.2f} "
          f"(anterior {100 * result['per_label']['1']['dice']:.2f}, posterior "
          f"{100 * result['per_label']['2']['dice']:.2f}), {result['iterations']} iterations, "
          f"{result['seconds_per_iteration']:.2f} s/it, {result['precision']['used']}, load "
          f"{result['load'][0]:.2f} -> {result['load'][1]:.2f}", flush=True)
    return result


def supervised_checkpoint(work: Path, budget: float, seed: int, label: str = "Supervised") -> Path:
    """The final checkpoint of the curve's SupervisedTrainer run of ``budget`` minutes (``label``
    AllLabeled: the all-labeled curve's)."""
    marker = work / "runs" / label / f"{budget:g}min_seed{seed}" / "checkpoint.txt"
    if not marker.is_file():
        sys.exit(f"no finished {label} run of {budget:g} min, seed {seed} in {work / 'runs'}: "
                 f"run `curve {'--all-labeled ' if label == ALL_LABELED else ''}--budgets {budget:g} --seeds {seed}` "
                 "first")
    return Path(marker.read_text(encoding="utf-8"))


def case_dice(runs: dict[int, dict]) -> dict[str, float]:
    """Per test case, the Dice of both labels averaged, then over the seeds."""
    cases = next(iter(runs.values()))["cases"]
    return {case: float(np.mean([np.mean(list(run["cases"][case].values())) for run in runs.values()]))
            for case in cases}


def cases_up(runs: dict[int, dict], reference: dict[int, dict]) -> str:
    """How many of the test cases score higher than with SupervisedTrainer (each side's seeds
    averaged per case): a mean gain that a few cases carry shows here."""
    mine, theirs = case_dice(runs), case_dice(reference)
    return f"{sum(mine[c] > theirs[c] for c in mine)} of {len(mine)}"


def compare_rows(results: dict[str, dict[int, dict]]) -> list[str]:
    """One row per ``--trainers`` entry; with an AllLabeled row, each row's share of the gap from
    SupervisedTrainer to that ceiling."""
    rows = ["| trainer | seeds | Dice % (mean of 2 labels) | vs Supervised | gap closed | test cases up | Dice anterior % "
            "| Dice posterior % | HD95 mm | ASD mm | iterations | s/it | wall / budget | load start -> end | precision |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    reference, ceiling = results.get("SupervisedTrainer"), results.get(ALL_LABELED)
    base = 100 * np.mean([r["mean"]["dice"] for r in reference.values()]) if reference else None
    top = 100 * np.mean([r["mean"]["dice"] for r in ceiling.values()]) if ceiling else None

    def stat(values, scale=1.0, digits=2):
        values = np.array([v for v in values if v is not None], float) * scale
        if not values.size:
            return "n/a"
        return f"{values.mean():.{digits}f}" + (f" ± {values.std():.{digits}f}" if values.size > 1 else "")
    for trainer, runs in results.items():
        if not runs:
            continue
        seeds = sorted(runs)
        dice = 100 * np.mean([runs[s]["mean"]["dice"] for s in seeds])
        gap = "n/a" if base is None or top is None or top <= base else f"{(dice - base) / (top - base):+.2f}"
        cells = [stat([runs[s]["mean"]["dice"] for s in seeds], 100),
                 "reference" if trainer == "SupervisedTrainer" else ("n/a" if base is None else f"{dice - base:+.2f}"),
                 {"SupervisedTrainer": "reference", ALL_LABELED: "ceiling"}.get(trainer, gap),
                 "reference" if trainer == "SupervisedTrainer" or not reference else cases_up(runs, reference)]
        cells += [stat([runs[s]["per_label"][str(label)]["dice"] for s in seeds], 100) for label in LABELS]
        cells += [stat([runs[s]["mean"][m] for s in seeds]) for m in ("hd95", "asd")]
        cells += [stat([runs[s]["iterations"] for s in seeds], digits=0),
                  stat([runs[s]["seconds_per_iteration"] for s in seeds]),
                  # equal compute means equal wall time: a run that ends early had less of it
                  stat([runs[s]["wall_seconds"] / (60 * runs[s]["budget"]["minutes"]) for s in seeds]),
                  ", ".join(f"{runs[s]['load'][0]:.2f} -> {runs[s]['load'][1]:.2f}" for s in seeds),
                  ", ".join(sorted({runs[s]["precision"]["used"] for s in seeds}))]
        rows.append(f"| {trainer} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return rows


def compare_figure(results: dict[str, dict[int, dict]], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trainers = [t for t, runs in results.items() if runs]
    fig, ax = plt.subplots(figsize=(1.2 * len(trainers) + 2.5, 4.5))
    for x, trainer in enumerate(trainers):
        seeds = [100 * r["mean"]["dice"] for r in results[trainer].values()]
        color = {"SupervisedTrainer": "C0", ALL_LABELED: "C2"}.get(trainer, "C1")
        ax.bar(x, np.mean(seeds), color=color, alpha=0.7)
        ax.plot([x] * len(seeds), seeds, "k.", ms=6)
        ax.annotate(f"{np.mean(seeds):.2f}", (x, max(seeds)), textcoords="offset points", xytext=(0, 4),
                    ha="center", fontsize=8)
    for reference, color in (("SupervisedTrainer", "C0"), (ALL_LABELED, "C2")):
        if results.get(reference):  # dashed: the reference's mean, so small differences read
            ax.axhline(100 * np.mean([r["mean"]["dice"] for r in results[reference].values()]), color=color,
                       ls="--", lw=0.8)
    ax.set_xticks(range(len(trainers)), [trainer_label(t).replace(":", "\n").replace(",", "\n") for t in trainers],
                  rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test Dice % (40 cases; bar: mean, dots: seeds)")
    low = min(100 * r["mean"]["dice"] for t in trainers for r in results[t].values())
    ax.set_ylim(max(0.0, low - 10), 100)
    # wrapped to the figure: a narrow figure of few rows would cut a long title off
    ax.set_title(textwrap.fill(title, int(fig.get_figwidth() * 11)), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def compare(args) -> None:
    work = args.work.absolute()
    specs = {text: parse_spec(text) for text in args.trainers}
    raw = prepare_data(work, args.data.absolute(), ALL_LABELED in specs, args.configuration)
    host = machine()
    suffix = configuration_suffix(args)
    source = None if args.from_budget is None else supervised_checkpoint(work, args.from_budget, args.from_seed,
                                                                         "Supervised" + suffix)
    results: dict[str, dict[int, dict]] = {text: {} for text in args.trainers}
    jobs = [(text, seed) for seed in args.seeds for text in args.trainers]
    for number, (text, seed) in enumerate(jobs, 1):
        spec = specs[text]
        label = spec.label + suffix + ("" if source is None else f"_from{args.from_budget:g}min")
        if source is not None and spec.label == ALL_LABELED:
            # the ceiling continues from its own checkpoint of the same budget: the same protocol
            init_from = supervised_checkpoint(work, args.from_budget, args.from_seed, ALL_LABELED + suffix)
        else:
            init_from = source
        folder = work / "runs" / label / f"{args.budget:g}min_seed{seed}"
        name = f"[{number}/{len(jobs)}] {label} {args.budget:g} min seed {seed}"
        if args.report and not (folder / "checkpoint.txt").is_file():
            print(f"{time.strftime('%H:%M:%S')} {name}: not run yet, left out (--report)", flush=True)
            continue
        results[text][seed] = run_and_score(args, work, raw, spec, args.budget, seed, folder, name, init_from)
        write_comparison(args, work, host, source, results, quiet=True)
    write_comparison(args, work, host, source, results)


def write_comparison(args, work: Path, host: dict, source: Path | None, results: dict[str, dict[int, dict]],
                     quiet: bool = False) -> None:
    """The table (.md), the records (.json) and the figure (.png) of the runs in ``results``. Two
    invocations side by side write the same files: ``--report`` rewrites them from every finished run."""
    tag = f"{'scratch' if source is None else f'from{args.from_budget:g}min'}_{args.budget:g}min{configuration_suffix(args)}"
    start = ("from scratch (semi-supervised trainers: shared supervised warm-up, auto)" if source is None else
             f"continuing from SupervisedTrainer's {args.from_budget:g}-minute checkpoint of seed {args.from_seed} "
             f"({source}) with --init-from (AllLabeled: from its own checkpoint of that budget and seed)")
    title = f"{args.budget:g} min per run, {start.split(' (')[0]}, {LABELED} labeled + {UNLABELED} unlabeled"
    settings = (f"Hippocampus development split ({LABELED} labeled / {UNLABELED} unlabeled / {TEST} test, "
                f"configuration {args.configuration}, "
                f"{work / 'split.json'}); fold all, final checkpoint, --time-budget {args.budget:g} min per run, "
                f"{start}; network, patch and batch: "
                f"{'the plan' if args.patch is None and args.batch_size is None and args.features is None else 'overridden'}"
                f" (features {args.features}, batch {args.batch_size}); {args.threads} thread(s), precision "
                f"{args.precision}; test mirroring {'on' if args.mirroring else 'off'}; CPU {host['cpu']} "
                f"({host['cores']} cores), bf16 units: {'yes' if host['bf16_units'] else 'no'}")
    rows = compare_rows(results)
    (work / f"hippocampus_compare_{tag}.md").write_text(settings + "\n\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (work / f"hippocampus_compare_{tag}.json").write_text(json.dumps(
        {"settings": vars(args) | {"work": str(work)}, "machine": host, "init_from": str(source) if source else None,
         "results": results}, indent=2, default=str), encoding="utf-8")
    if any(results.values()):
        compare_figure(results, title, work / f"hippocampus_compare_{tag}.png")
    if not quiet:
        print(settings)
        print("\n".join(rows), flush=True)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--work", type=Path, default=REPO / "benchmarks" / "_work" / "hippocampus",
                        help="split, converted data, plans, runs and the result files")
    common.add_argument("--data", type=Path, default=SOURCE, help="the MSD Task04_Hippocampus folder")
    common.add_argument("--seeds", type=int, nargs="+", default=[0])
    common.add_argument("--threads", type=int, default=1, help="threads per run (runs go one at a time)")
    common.add_argument("--num-workers", type=int, default=0, help="loader processes per stream")
    common.add_argument("--precision", default="auto", help="versemi_train --precision (auto: bf16 only where "
                                                            "the CPU has bf16 units)")
    common.add_argument("--patch", type=int, nargs=3, help="override the plan's patch (z y x)")
    common.add_argument("--batch-size", type=int, help="override the plan's batch size")
    common.add_argument("--features", type=int, nargs="+", help="override the plan's features per stage")
    common.add_argument("--configuration", default="3d_fullres", choices=["3d_fullres", "2d"],
                        help="train and predict this configuration (2d: slices, its own cache, runs and tables "
                             "named ..._2d)")
    common.add_argument("--report", action="store_true", help="train nothing: the table of the runs that have "
                                                              "finished")
    common.add_argument("--mirroring", action="store_true", help="mirroring at test time (8x slower on a CPU: "
                                                                 "5 min instead of 40 s for the 40 cases)")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    modes = parser.add_subparsers(dest="mode", required=True)
    curve_parser = modes.add_parser("curve", parents=[common], help="SupervisedTrainer's Dice against the time budget")
    curve_parser.add_argument("--budgets", type=float, nargs="+", default=[5.0, 10.0, 20.0, 40.0],
                              help="--time-budget of each run, minutes")
    curve_parser.add_argument("--all-labeled", action="store_true", help=f"the ceiling: all {LABELED + UNLABELED} "
                              f"training cases labeled (runs/{ALL_LABELED})")
    curve_parser.set_defaults(run=curve)
    compare_parser = modes.add_parser("compare", parents=[common], help="trainers at one budget, from scratch or "
                                                                       "continuing a supervised checkpoint")
    compare_parser.add_argument("--trainers", nargs="+", default=["SupervisedTrainer", "MeanTeacherTrainer",
                                                                  "VerSemiTrainer"],
                                help="trainer classes, each optionally with settings (Trainer:key=value,...: "
                                     "--method settings, or versemi_train flags as --flag=value), and "
                                     f"{ALL_LABELED}, the all-labeled ceiling")
    compare_parser.add_argument("--budget", type=float, required=True, help="--time-budget of each run, minutes")
    compare_parser.add_argument("--from-budget", type=float, help="continue from the curve's SupervisedTrainer run "
                                                                  "of this many minutes (--init-from)")
    compare_parser.add_argument("--from-seed", type=int, default=0, help="the seed of that run")
    compare_parser.set_defaults(run=compare)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if not args.data.is_dir():
        sys.exit(f"real hippocampus data not found at {args.data}: this benchmark needs ../shared beside the "
                 "checkout, or --data")
    if os.environ.get("OMP_NUM_THREADS") is None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for this process's preprocessing and prediction
    args.run(args)


if __name__ == "__main__":
    main()
