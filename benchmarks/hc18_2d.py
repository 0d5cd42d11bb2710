"""Semi-supervised 2d segmentation of real fetal head ultrasound (HC18) at 10 % and 20 % labeled.

Data: the 300 images of ``../shared/data/hc18`` (the HC18 challenge's training set, 244 subjects:
``NNN_HC.png``, ``NNN_2HC.png``, ... show one subject). Development split, by subject, with a
fixed seed: subjects holding 60 images are a development test set (imagesTs/labelsTs: their labels
are only read to score), the other 240 images are the training part. Of the training part, whole
subjects holding 10 % (24) and 20 % (48) of the images are labeled, the 10 % set inside the 20 %
set, and the rest is used without labels. The converter (``convert_hc18`` with ``test_ids``)
writes ``<work>/raw/HC18`` (labels to the centre of the drawn outline, where the challenge's
ellipse runs; a work folder converted by an earlier version, whose labels filled the whole line
and measured 1.1 mm more on average, is refused); its ``case_order`` lists the 10 % set first,
then the rest of the 20 % set, so ``--labeled HC18=24`` and ``HC18=48`` plan the two experiments
``HC18_10pct`` and ``HC18_20pct`` (``-c 2d``). The split is written to ``<work>/split.json`` once
and checked on every later start.

    python benchmarks/hc18_2d.py --work WORK --prepare-only      # split, convert, plan, preprocess
    python benchmarks/hc18_2d.py --work WORK --budget 30 --seeds 0 1 \\
        --trainers SupervisedTrainer SelfTrainingTrainer MeanTeacherTrainer
    python benchmarks/hc18_2d.py --work WORK --seeds 0 1 --report # the table of what finished

Resolution and patch (``--spacing-scale``, default 6; ``--patch-size``, default 160 x 224;
``--batch-size``, default 8): the images are about 540 x 800 pixels of 0.05 to 0.33 mm, and the 2d
plan resamples them to the median pixel, 0.12 mm: patch 384 x 576, batch 12, 7 stages, where even
the plan's CPU preset (a quarter of the features) costs several seconds a step on one CPU thread.
nnU-Net caps the patch by the median image, and a sonographer zooms out for a larger head, so in mm
the largest heads (up to about 115 mm across) are wider than the median image: at 4 times coarser
(0.49 mm, median image 134 x 194) the plan's patch, 160 x 224, covers 78 x 109 mm, and the
supervised model found the largest heads only in part (their HC off by 20 to 180 mm;
benchmarks/RESULTS.md), which planning now warns about. At 6 times coarser (0.73 mm) the same
patch and batch cover 117 x 164 mm for the same step cost (about 0.4 s supervised, one thread,
bf16): every head fits, and the supervised model's Dice rose by about 3 and its mean HC error
halved, at the cost of the smallest heads (about 30 pixels across), whose HC got worse.
``--spacing-scale 4 --patch-size plan --batch-size 0`` gives the earlier setting.
30 minutes give a supervised run about 4,000 iterations and leave a semi-supervised method
about 1,300 after its warm-up (20 minutes would be too few for it to start, see below).
Predictions are returned in each image's own geometry, so Dice, HD95, ASD and the head
circumference are measured at full resolution whatever the scale. ``--prepare-only`` prints the
plan; a work folder holds one scale (its plans refuse another).

Runs: ``versemi_train 2d all -e HC18_<share>pct -tr TRAINER --time-budget BUDGET --seed SEED
--num-workers 0`` for every share, trainer and seed, one after the other, ``--threads`` each, the
plan's CPU preset on a CPU (``--network-size``), final checkpoint. A ``--trainers`` entry may carry
settings, ``MeanTeacherTrainer:weight_consistency=1`` (a ``--method`` setting, JSON value) or
``SelfTrainingTrainer:--supervised-warm-up=0.2`` (a versemi_train flag); its runs live in their own
folder. A semi-supervised trainer starts its method after 1,000 supervised iterations where 1,000
are left for it (``--supervised-warm-up auto``): a budget shorter than that trains it supervised
from start to end (the table's "method iterations" is 0 then; give the trainer
``:--supervised-warm-up=0.2`` or a longer ``--budget``).

Scoring: ``versemi_predict -c 2d -f all --lcc`` on the 60 test images (test-time mirroring, as
nnU-Net predicts, unless ``--no-mirroring``: 4 flips of a 2d image cost about 20 s for the 60 images
here and gave +0.5 to +1.1 Dice and 0.4 to 0.7 mm less HC error on each of four x6 models; the
largest connected component kept unless ``--no-lcc``: a head is one
object, and stray regions, which the models leave on some images, distort the fitted ellipse:
without it, SupervisedTrainer's 30-minute run had a median HC error of 2.9 mm but a mean of 16.9,
15 of 60 images above 10 mm), ``versemi_evaluate --head-circumference``: Dice, HD95 and ASD in mm (2d
surfaces) and the absolute difference of the head circumferences of ellipses fitted to the
predicted and the reference mask, in mm from each image's pixel size (a head not found measures
0, so it is off by its whole circumference: never dropped from the mean, and counted). The table has mean ± std over seeds per share and
trainer, the difference to SupervisedTrainer at the same share, how many test images it improves,
iterations, s/it, wall time over the budget, load, precision and the CPU model; it is written to
``<work>/hc18_2d.md`` and ``.json``, the figure (Dice and HC difference per trainer and share) to
``<work>/hc18_2d.png`` (``--figure-to`` copies it elsewhere, e.g. benchmarks/figures/).

Continuation (``--from-budget B [--from-seed S]``): every run starts from the final checkpoint of
SupervisedTrainer's B-minute run of seed S at the same share (``--init-from``: no supervised
warm-up, a method's teacher starts from it, a pre-training stage is skipped) and trains
``--budget`` more minutes, SupervisedTrainer continuing as the reference (ERSR's public code starts
both of its networks from a supervised model); folders ``<label>_from<B>min``, outputs
``hc18_2d_from<B>min_<budget>min.*``.

Runs live in ``<work>/runs/<share>pct/<label>/<budget>min_seed<seed>`` with ``command.json``,
``train.log``, ``wall.json``, ``predict.log``, ``predictions/``, ``evaluation/`` and
``evaluation.json``: a finished run and its evaluation are reused, a killed run is continued
(``--continue``), so rerunning the same command finishes what is missing. ``--report`` trains
nothing: it scores finished runs not yet scored and writes the table of every finished run of the
listed shares, trainers and seeds. Not a test.
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
from typing import NamedTuple

import numpy as np

import budget_runs

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "hc18"
DATASET = "HC18"
CONFIGURATION = "2d"
LABEL = 1  # the head
SPLIT_SEED = 0
TEST_IMAGES = 60
SHARES = (10, 20)  # percent of the training images labeled; each set holds the smaller ones
DEFAULT_SPACING_SCALE = 6.0
# a patch of 117 x 164 mm at x6: the largest heads (up to about 115 mm across) fit whole, where the
# patch the median image allows (78 x 109 mm at x4) cut them, and the HC of those images missed
DEFAULT_PATCH_SIZE = [160, 224]
# the batch the x4 plan chose for this patch; at x6 nnU-Net's 5 %-of-the-data rule would make it 3
DEFAULT_BATCH_SIZE = 8
REFERENCE = "SupervisedTrainer"
NAME = "hc18_2d"
# how a cached evaluation scored the head circumference: one scored otherwise is scored again
HC_SCORING = "no head found counts as circumference 0"


# ----- the split


def subjects_of(source: Path) -> dict[str, list[str]]:
    """Subject -> its case ids, in the converter's order (subject number, then image number)."""
    from versemi.datasets.converters.hc18 import CSV_NAME, read_pixel_sizes

    images = sorted(read_pixel_sizes(source / CSV_NAME), key=lambda image: (int(image.subject), image.image_number))
    subjects: dict[str, list[str]] = {}
    for image in images:
        subjects.setdefault(image.subject, []).append(image.case_id)
    return subjects


def take_subjects(order: list[str], subjects: dict[str, list[str]], target: int) -> list[str]:
    """Whole subjects, in ``order``, holding exactly ``target`` images: a subject that would
    overshoot is passed over for a later, smaller one."""
    taken, count = [], 0
    for subject in order:
        if count == target:
            break
        if count + len(subjects[subject]) <= target:
            taken.append(subject)
            count += len(subjects[subject])
    if count != target:
        sys.exit(f"cannot choose whole subjects holding exactly {target} images")
    return taken


def make_split(source: Path) -> dict:
    """The development split: test images, the training case order (the 10 % labeled set first,
    then the rest of the 20 % set, then the unlabeled images) and the labeled ids per share."""
    subjects = subjects_of(source)
    order = [sorted(subjects)[i] for i in np.random.default_rng(SPLIT_SEED).permutation(len(subjects))]
    test = take_subjects(order, subjects, TEST_IMAGES)
    training = [s for s in order if s not in test]
    total = sum(len(subjects[s]) for s in training)
    labeled: list[str] = []
    sets: dict[int, list[str]] = {}
    for share in sorted(SHARES):  # each share adds subjects to the smaller share's, so the sets nest
        have = sum(len(subjects[s]) for s in labeled)
        added = take_subjects([s for s in training if s not in labeled], subjects, round(share * total / 100) - have)
        labeled += sorted(added, key=int)
        sets[share] = list(labeled)
    unlabeled = sorted((s for s in training if s not in labeled), key=int)
    return {"seed": SPLIT_SEED, "test": ids_of(sorted(test, key=int), subjects),
            "case_order": ids_of(labeled + unlabeled, subjects),
            "labeled": {f"{share}pct": ids_of(sets[share], subjects) for share in SHARES},
            "subjects": {"test": len(test), "training": len(training),
                         **{f"labeled_{share}pct": len(sets[share]) for share in SHARES}}}


def ids_of(chosen: list[str], subjects: dict[str, list[str]]) -> list[str]:
    return [case for subject in chosen for case in subjects[subject]]


def write_split(work: Path, split: dict) -> None:
    split_file = work / "split.json"
    if split_file.is_file() and json.loads(split_file.read_text(encoding="utf-8")) != split:
        sys.exit(f"{split_file} holds another split than this code makes (another seed, data or version): use "
                 "another --work, or move that folder away")
    split_file.write_text(json.dumps(split, indent=1) + "\n", encoding="utf-8")


def experiment(share: int) -> str:
    return f"{DATASET}_{share}pct"


# ----- conversion, planning, preprocessing


def convert(work: Path, source: Path, split: dict, show_progress: bool) -> Path:
    """``<work>/raw/HC18`` with the test images in imagesTs/labelsTs and the split's case order
    (reused where it already holds this split; another split there is refused)."""
    from versemi.atomic import read_json, write_json
    from versemi.datasets.converters import convert_hc18
    from versemi.datasets.layout import load_dataset

    raw = work / "raw" / DATASET
    if not (raw / "dataset.json").is_file():
        convert_hc18(source, raw, overwrite=raw.exists(), show_progress=show_progress, test_ids=split["test"])
    excess = label_excess_mm(raw, source, split["test"])
    if excess > 0.5:
        sys.exit(f"{raw} was converted by an earlier versemi_convert: its labels fill the whole drawn outline, and "
                 f"their circumference exceeds the challenge's by {excess:.2f} mm on average; use another --work "
                 "(runs trained on those labels cannot be set beside new ones)")
    dataset = load_dataset(raw)
    if (sorted(c.case_id for c in dataset.test_cases()) != sorted(split["test"])
            or sorted(c.case_id for c in dataset.labeled_cases()) != sorted(split["case_order"])):
        sys.exit(f"{raw} holds another train/test split: use another --work, or delete that folder")
    meta = read_json(raw / "dataset.json")
    if meta.get("case_order") != split["case_order"]:
        # --labeled HC18=N keeps the first N cases of case_order: the share's labeled set
        write_json({**meta, "case_order": split["case_order"]}, raw / "dataset.json")
    return raw


def label_excess_mm(raw: Path, source: Path, case_ids: list[str]) -> float:
    """The mean of (circumference of the ellipse fitted to the converted label) - (the csv's head
    circumference) over ``case_ids``, held-out cases of ``raw``: about 0.00 mm for the current
    converter's labels (to the centre of the drawn line), about 1.1 mm for the earlier ones."""
    import csv

    import SimpleITK as sitk

    from versemi.datasets.converters.hc18 import CSV_NAME, read_pixel_sizes
    from versemi.ellipse import head_circumference

    listed = {row[0]: float(row[2]) for row in csv.reader((source / CSV_NAME).read_text(encoding="utf-8-sig")
                                                           .splitlines()[1:]) if row}
    excess = []
    for image in read_pixel_sizes(source / CSV_NAME):
        if image.case_id in case_ids:
            label = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTs" / f"{image.case_id}.nii.gz")))[0]
            excess.append(head_circumference(label > 0, (image.pixel_mm, image.pixel_mm)) - listed[image.name])
    return float(np.mean(excess))


def plan(work: Path, share: int, labeled: int, spacing_scale: float, patch_size: list[int] | None,
         show_progress: bool) -> None:
    """Plan and preprocess the share's experiment, 2d configuration (reused when done)."""
    from versemi.errors import InputError
    from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess
    from versemi.plans.planner import PlanSettings

    try:
        plan_and_preprocess(ExperimentRequest([DATASET], work / "raw", work / "versemi_plans",
                                              experiment=experiment(share), labeled_limits={DATASET: labeled},
                                              num_processes=1, settings=PlanSettings(spacing_scale=spacing_scale,
                                                                                  patch_size={CONFIGURATION: patch_size}
                                                                                  if patch_size else {}),
                                              show_progress=show_progress, configurations=[CONFIGURATION]))
    except InputError as exc:
        sys.exit(f"{exc}\n(an experiment planned otherwise, e.g. at another --spacing-scale or --patch-size, is kept: "
                 "use another --work for other settings)")


def prepare_data(args, work: Path) -> Path:
    """Write the split, convert, plan and preprocess every share; returns raw/HC18."""
    with budget_runs.preparing(work):
        split = make_split(args.data)
        write_split(work, split)
        print(f"{time.strftime('%H:%M:%S')} split: {len(split['test'])} test images "
              f"({split['subjects']['test']} subjects), {len(split['case_order'])} training images "
              f"({split['subjects']['training']} subjects), labeled "
              + ", ".join(f"{key} {len(ids)}" for key, ids in split["labeled"].items()), flush=True)
        raw = convert(work, args.data, split, not args.quiet)
        for share in args.shares:
            print(f"{time.strftime('%H:%M:%S')} planning and preprocessing {experiment(share)} (-c {CONFIGURATION}, "
                  f"--spacing-scale {args.spacing_scale:g}"
                  + (f", --patch-size {'x'.join(map(str, args.patch_size))}" if args.patch_size else "") + ")", flush=True)
            plan(work, share, len(split["labeled"][f"{share}pct"]), args.spacing_scale, args.patch_size, not args.quiet)
        return raw


def plan_summary(work: Path, share: int) -> dict:
    """What the 2d plan of a share's experiment chose."""
    plans = json.loads((work / "versemi_plans" / experiment(share) / "plans.json").read_text(encoding="utf-8"))
    configuration, dataset = plans["configurations"][CONFIGURATION], plans["datasets"][DATASET]
    return {"target_spacing_mm": configuration["target_spacing"][DATASET][1:],
            "median_shape": dataset["median_shape_after_resampling"][1:],
            "patch": configuration["patch_size"][1:], "batch": configuration["batch_size"],
            "features": configuration["network"]["features"], "cpu_preset": configuration["cpu_preset"],
            "labeled": len(dataset["labeled_cases"]), "unlabeled": len(dataset["unlabeled_cases"])}


def describe_plan(summary: dict) -> str:
    return (f"target spacing {' x '.join(f'{s:.3f}' for s in summary['target_spacing_mm'])} mm, median image "
            f"{' x '.join(map(str, summary['median_shape']))}, patch {' x '.join(map(str, summary['patch']))}, "
            f"batch {summary['batch']}, features {summary['features']}; CPU preset: features "
            f"{summary['cpu_preset']['features']}, batch {summary['cpu_preset']['batch_size']}; "
            f"{summary['labeled']} labeled / {summary['unlabeled']} unlabeled")


# ----- runs


class RunSpec(NamedTuple):
    """One ``--trainers`` entry: the trainer class, its folder label, ``--method`` settings and
    extra versemi_train flags."""
    text: str
    trainer: str
    label: str
    method: dict
    flags: tuple[str, ...] = ()


def parse_spec(text: str) -> RunSpec:
    """A ``--trainers`` entry (``budget_runs.parse_trainer_options``)."""
    return RunSpec(text, *budget_runs.parse_trainer_options(text))


def run_folder(work: Path, share: int, spec: RunSpec, budget: float, seed: int, from_budget: float | None = None
               ) -> Path:
    label = spec.label + ("" if from_budget is None else f"_from{from_budget:g}min")
    return work / "runs" / f"{share}pct" / label / f"{budget:g}min_seed{seed}"


def output_name(args) -> str:
    return NAME if args.from_budget is None else f"{NAME}_from{args.from_budget:g}min_{args.budget:g}min"


def supervised_checkpoint(args, work: Path, share: int) -> Path:
    """The final checkpoint of SupervisedTrainer's run of ``--from-budget`` minutes, seed ``--from-seed``."""
    folder = run_folder(work, share, parse_spec(REFERENCE), args.from_budget, args.from_seed)
    if not (folder / "checkpoint.txt").is_file():
        sys.exit(f"{folder} has not finished: train it first (--trainers {REFERENCE} --budget {args.from_budget:g} "
                 f"--seeds {args.from_seed} --shares {share})")
    return Path((folder / "checkpoint.txt").read_text(encoding="utf-8"))


def train_command(args, share: int, spec: RunSpec, seed: int, init_from: Path | None = None) -> list[str]:
    command = [str(budget_runs.BIN / "versemi_train"), CONFIGURATION, "all", "-e", experiment(share),
               "-tr", spec.trainer, "--time-budget", f"{args.budget:g}", "--seed", str(seed),
               "--num-workers", str(args.num_workers), "--precision", args.precision,
               "--network-size", args.network_size, "--device", "cpu", "--quiet"]
    if spec.method:
        command += ["--method", json.dumps(spec.method, sort_keys=True)]
    if init_from is not None:
        command += ["--init-from", str(init_from)]
    return command + list(spec.flags) + (["--batch-size", str(args.batch_size)] if args.batch_size else [])


def run_subprocess(command: list[str], log: Path, threads: int, results: Path, plans: Path) -> None:
    env = {**os.environ, "VERSEMI_RESULTS": str(results), "VERSEMI_PLANS": str(plans),
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "w") as out:
        if subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"{Path(command[0]).name} failed: see {log}")


def score(args, work: Path, raw: Path, share: int, spec: RunSpec, folder: Path) -> dict:
    """Predict the test images with the run's final checkpoint and score them (cached for the same
    test-time mirroring, backend and component rule)."""
    from versemi.model.checkpoint import load_checkpoint

    result_file = folder / "evaluation.json"
    checkpoint = Path((folder / "checkpoint.txt").read_text(encoding="utf-8"))
    if result_file.is_file():
        cached = json.loads(result_file.read_text(encoding="utf-8"))
        if (cached["mirroring"], cached["backend"], cached.get("lcc", False), cached.get("hc_scoring")) == (
                args.mirroring, args.backend, args.lcc, HC_SCORING):
            return cached
    plans, predictions = work / "versemi_plans", folder / "predictions"
    predict = [str(budget_runs.BIN / "versemi_predict"), "-i", str(raw / "imagesTs"), "-o", str(predictions),
               "-e", experiment(share), "-tr", spec.trainer, "-c", CONFIGURATION, "-f", "all",
               "--checkpoint", "final", "--device", "cpu", "--precision", args.precision, "--backend", args.backend,
               "--overwrite", "--quiet"] + ([] if args.mirroring else ["--no-mirroring"]) + (["--lcc"] if args.lcc else [])
    started = time.time()
    run_subprocess(predict, folder / "predict.log", args.threads, folder / "results", plans)
    predict_seconds = time.time() - started
    evaluate = [str(budget_runs.BIN / "versemi_evaluate"), "-r", str(raw / "labelsTs"), "-p", str(predictions),
                "-o", str(folder / "evaluation"), "--labels", str(LABEL), "--head-circumference"]
    run_subprocess(evaluate, folder / "evaluate.log", args.threads, folder / "results", plans)
    summary = json.loads((folder / "evaluation" / "summary.json").read_text(encoding="utf-8"))
    state = load_checkpoint(checkpoint)
    result = {**scores(summary), **budget_runs.training_record(folder, state), "predict_seconds": predict_seconds,
              "precision": precision_used(state["config"]),
              "method_iterations": method_iterations(spec, state["config"]),
              "mirroring": args.mirroring, "backend": args.backend, "lcc": args.lcc, "hc_scoring": HC_SCORING,
              "network": {"features": state["config"].get("features"), "batch_size": state["config"].get("batch_size"),
                          "network_size": state["config"].get("network_size")}}
    result_file.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return result


def scores(summary: dict) -> dict:
    """The head's figures from versemi_evaluate's summary, and per case Dice and HC difference."""
    key = str(LABEL)
    circumference = summary["head_circumference"][key]
    return {"mean": {**summary["mean"][key], "hc_abs_difference": circumference["mean_abs_difference"]},
            "counts": {**summary["counts"][key], "hc_no_head": circumference["missed"]},
            "cases": {entry["case"]: {"dice": entry["metrics"][key]["dice"],
                                      "hc_abs_difference": entry["head_circumference"][key]["abs_difference"],
                                      "hc_reference": entry["head_circumference"][key]["reference"]}
                      for entry in summary["cases"]}}


def method_iterations(spec: RunSpec, config: dict) -> int | None:
    """Iterations of a semi-supervised method after its supervised warm-up (0: the schedule was too
    short for it and the run stayed supervised); None for SupervisedTrainer."""
    if spec.trainer == REFERENCE:
        return None
    return (config["epochs"] - (config.get("warm_up_epochs") or 0)) * config["iterations_per_epoch"]


def precision_used(config: dict) -> dict:
    import torch
    from versemi.model.precision import autocast_dtype

    dtype = autocast_dtype(config.get("precision", "auto"), config.get("amp", True), torch.device("cpu"))
    return {"requested": config.get("precision"), "used": "fp32" if dtype is None else str(dtype)}


def run_and_score(args, work: Path, raw: Path, share: int, spec: RunSpec, seed: int, name: str,
                  left_minutes: float) -> dict | None:
    """Train (or reuse, or with --report skip) one run and score it; None where it has not finished."""
    folder = run_folder(work, share, spec, args.budget, seed, args.from_budget)
    finished = (folder / "checkpoint.txt").is_file()
    if args.report and not finished:
        print(f"{time.strftime('%H:%M:%S')} {name}: not finished, left out (--report)", flush=True)
        return None
    init_from = None if args.from_budget is None else supervised_checkpoint(args, work, share)
    process = budget_runs.start_training(train_command(args, share, spec, seed, init_from), folder, experiment(share),
                                         spec.trainer, work / "versemi_plans", args.threads, CONFIGURATION)
    if process is None:
        print(f"{time.strftime('%H:%M:%S')} {name}: finished earlier, reused", flush=True)
    else:
        # from the budgets alone: setup, warm-up and scoring come on top
        print(f"{time.strftime('%H:%M:%S')} {name}: {'continuing' if process.resumed else 'training'} "
              f"(load {process.load_before:.2f}), ends about "
              f"{time.strftime('%H:%M', time.localtime(time.time() + 60 * args.budget))}, all runs about "
              f"{time.strftime('%H:%M', time.localtime(time.time() + 60 * left_minutes))}; log {folder / 'train.log'}",
              flush=True)
        budget_runs.finish_training(process)
    if not (folder / "evaluation.json").is_file():
        print(f"{time.strftime('%H:%M:%S')} {name}: predicting and scoring the test images", flush=True)
    result = score(args, work, raw, share, spec, folder)
    hc = result["mean"]["hc_abs_difference"]
    print(f"{time.strftime('%H:%M:%S')} {name}: Dice {100 * result['mean']['dice']:.2f}, HD95 "
          f"{_text(result['mean']['hd95'])} mm, ASD {_text(result['mean']['asd'])} mm, |HC diff| {_text(hc)} mm "
          f"(median {_text(hc_median(result))} mm, {hc_misses(result)} images > {HC_MISS_MM:g} mm off, "
          f"{result['counts']['hc_no_head']} with no head found), {result['iterations']} iterations, "
          f"{result['seconds_per_iteration']:.2f} s/it, wall {result['wall_seconds'] / 60:.1f} min, "
          f"{result['precision']['used']}, load {result['load'][0]:.2f} -> {result['load'][1]:.2f}", flush=True)
    return result


def _text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# ----- the table and the figure


def machine() -> dict:
    from versemi.model.precision import cpu_has_bf16

    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
             if line.startswith("model name")]
    return {"cpu": names[0] if names else "unknown", "cores": os.cpu_count(), "bf16_units": cpu_has_bf16()}


def stat(values, scale: float = 1.0, digits: int = 2) -> str:
    """Mean ± std over the seeds (the std only with several), n/a where none is defined."""
    values = np.array([v for v in values if v is not None], float) * scale
    if not values.size:
        return "n/a"
    return f"{values.mean():.{digits}f}" + (f" ± {values.std():.{digits}f}" if values.size > 1 else "")


def mean_of(runs: dict[int, dict], metric: str, scale: float = 1.0) -> float | None:
    values = [r["mean"][metric] for r in runs.values() if r["mean"][metric] is not None]
    return scale * float(np.mean(values)) if values else None


def cases_up(runs: dict[int, dict], reference: dict[int, dict]) -> str:
    """How many test images score a higher Dice than with SupervisedTrainer (each side's seeds
    averaged per image): a mean gain that a few images carry shows here."""
    def per_case(side):
        cases = next(iter(side.values()))["cases"]
        return {case: np.mean([run["cases"][case]["dice"] for run in side.values()]) for case in cases}
    mine, theirs = per_case(runs), per_case(reference)
    return f"{sum(mine[c] > theirs[c] for c in mine)} of {len(mine)}"


def difference(runs: dict[int, dict], reference: dict[int, dict] | None, metric: str, scale: float) -> str:
    mine, theirs = mean_of(runs, metric, scale), None if not reference else mean_of(reference, metric, scale)
    return "n/a" if mine is None or theirs is None else f"{mine - theirs:+.2f}"


HC_MISS_MM = 10.0  # an image whose circumference is this far off shows a head found in part or not at all


def hc_median(run: dict) -> float | None:
    """The median absolute HC difference over the test images with a circumference: the mean
    follows the few images where the head is found in part, the median the typical image."""
    values = [c["hc_abs_difference"] for c in run["cases"].values() if c["hc_abs_difference"] is not None]
    return float(np.median(values)) if values else None


def hc_misses(run: dict) -> int:
    """Test images whose circumference is more than HC_MISS_MM off (a head not found among them)."""
    return sum(c["hc_abs_difference"] is not None and c["hc_abs_difference"] > HC_MISS_MM for c in run["cases"].values())


def table(results: dict[int, dict[str, dict[int, dict]]], budget: float) -> list[str]:
    rows = ["| labeled | trainer | seeds | Dice % | vs Supervised | test images up | HD95 mm | ASD mm "
            "| HC abs. diff. mm | vs Supervised | HC median mm | images > 10 mm off | no head found "
            "| iterations | method iterations | s/it | wall / budget "
            "| load start -> end | precision |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for share, by_trainer in results.items():
        reference = next((runs for text, runs in by_trainer.items() if parse_spec(text).label == "Supervised"), None)
        for text, runs in by_trainer.items():
            if not runs:
                continue
            seeds, is_reference = sorted(runs), runs is reference
            cells = [stat([runs[s]["mean"]["dice"] for s in seeds], 100),
                     "reference" if is_reference else difference(runs, reference, "dice", 100),
                     "reference" if is_reference or not reference else cases_up(runs, reference),
                     stat([runs[s]["mean"]["hd95"] for s in seeds]), stat([runs[s]["mean"]["asd"] for s in seeds]),
                     stat([runs[s]["mean"]["hc_abs_difference"] for s in seeds]),
                     "reference" if is_reference else difference(runs, reference, "hc_abs_difference", 1),
                     stat([hc_median(runs[s]) for s in seeds]),
                     ", ".join(str(hc_misses(runs[s])) for s in seeds),
                     ", ".join(str(runs[s]["counts"]["hc_no_head"]) for s in seeds),
                     stat([runs[s]["iterations"] for s in seeds], digits=0),
                     "n/a" if is_reference else stat([runs[s]["method_iterations"] for s in seeds], digits=0),
                     stat([runs[s]["seconds_per_iteration"] for s in seeds]),
                     stat([runs[s]["wall_seconds"] / (60 * budget) for s in seeds]),
                     ", ".join(f"{runs[s]['load'][0]:.2f} -> {runs[s]['load'][1]:.2f}" for s in seeds),
                     ", ".join(sorted({runs[s]["precision"]["used"] for s in seeds}))]
            rows.append(f"| {share} % | {text} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return rows


def figure(results: dict[int, dict[str, dict[int, dict]]], title: str, path: Path) -> None:
    """Dice and |HC difference| per trainer (x) and share (colour): mean ± std over seeds, dots = seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trainers = list(dict.fromkeys(text for by_trainer in results.values() for text, runs in by_trainer.items() if runs))
    shares = [share for share, by_trainer in results.items() if any(by_trainer.values())]
    width = 0.8 / max(len(shares), 1)
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 3 + 1.6 * len(trainers)), 4.8))
    for ax, metric, scale, label in ((axes[0], "dice", 100, "test Dice %"),
                                     (axes[1], "hc_abs_difference", 1, "|HC predicted - reference| mm")):
        for j, share in enumerate(shares):
            for i, text in enumerate(trainers):
                runs = results[share].get(text) or {}
                values = [scale * r["mean"][metric] for r in runs.values() if r["mean"][metric] is not None]
                if not values:
                    continue
                x = i + (j - (len(shares) - 1) / 2) * width
                ax.bar(x, np.mean(values), width, yerr=np.std(values) if len(values) > 1 else None, capsize=3,
                       color=f"C{j}", alpha=0.6, label=f"{share} % labeled" if i == 0 else None)
                ax.plot([x] * len(values), values, "k.", ms=5)
                ax.annotate(f"{np.mean(values):.2f}", (x, max(values)), textcoords="offset points", xytext=(0, 3),
                            ha="center", fontsize=7)
        ax.set_xticks(range(len(trainers)), [t.removesuffix("Trainer").replace(":", "\n").replace(",", "\n")
                                             for t in trainers], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    low = min((100 * r["mean"]["dice"] for by_trainer in results.values() for runs in by_trainer.values()
               for r in runs.values()), default=0.0)
    axes[0].set_ylim(max(0.0, low - 10), 100)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(args, work: Path, host: dict, plan_settings: dict, results: dict, quiet: bool = False) -> None:
    """The table (.md), the records (.json) and the figure (.png) of the runs in ``results``."""
    split = json.loads((work / "split.json").read_text(encoding="utf-8"))
    labeled = ", ".join(f"{share} % = {len(split['labeled'][f'{share}pct'])} images "
                        f"({split['subjects'][f'labeled_{share}pct']} subjects)" for share in args.shares)
    settings = (f"HC18 development split by subject (seed {split['seed']}): {len(split['test'])} test images, "
                f"{len(split['case_order'])} training images, labeled {labeled}, the rest unlabeled "
                f"({work / 'split.json'}); configuration 2d, --spacing-scale {args.spacing_scale:g} ("
                + "; ".join(f"{share} %: {describe_plan(plan_settings[share])}" for share in plan_settings)
                + f"); fold all, final checkpoint, --time-budget {args.budget:g} min per run, --network-size "
                f"{args.network_size}, {args.threads} thread(s), {args.num_workers} loader worker(s), precision "
                f"{args.precision}; test images predicted in their own geometry (mirroring "
                f"{'on' if args.mirroring else 'off'}, backend {args.backend}, largest connected component "
                f"{'kept' if args.lcc else 'not applied'}) and scored at full resolution "
                f"(distances and HC in mm); CPU {host['cpu']} ({host['cores']} cores), bf16 units: "
                f"{'yes' if host['bf16_units'] else 'no'}")
    start = "" if args.from_budget is None else f"from SupervisedTrainer's {args.from_budget:g} min, "
    title = (f"HC18 2d, {start}{args.budget:g} min per run, spacing x{args.spacing_scale:g}, "
             f"{len(split['test'])} test images\n"
             "bar: mean ± std over seeds, dots: seeds")
    rows = table(results, args.budget)
    name = output_name(args)
    if args.from_budget is not None:
        settings += (f"; every run continues SupervisedTrainer's {args.from_budget:g}-minute run of seed {args.from_seed} "
                     f"at the same share (--init-from) for {args.budget:g} more minutes")
    (work / f"{name}.md").write_text(settings + "\n\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (work / f"{name}.json").write_text(json.dumps(
        {"settings": vars(args) | {"work": str(work)}, "machine": host, "plans": plan_settings,
         "split": str(work / "split.json"),
         "results": {f"{share}pct": by_trainer for share, by_trainer in results.items()}},
        indent=2, default=str), encoding="utf-8")
    if any(runs for by_trainer in results.values() for runs in by_trainer.values()):
        figure(results, title, work / f"{name}.png")
        if args.figure_to is not None:
            args.figure_to.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / f"{name}.png", args.figure_to / f"{name}.png")
    if not quiet:
        print(settings)
        print("\n".join(rows), flush=True)


# ----- the command


def build_parser() -> argparse.ArgumentParser:
    from versemi.console import add_quiet_option

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "_work" / "hc18_2d",
                        help="split, converted data, plans, runs and the result files")
    parser.add_argument("--data", type=Path, default=SOURCE, help="the HC18 folder (training_set/ and the csv)")
    parser.add_argument("--trainers", nargs="+", default=["SupervisedTrainer", "SelfTrainingTrainer",
                                                          "MeanTeacherTrainer"],
                        help="trainer classes, each optionally with settings (Trainer:key=value,...: --method "
                             "settings, or versemi_train flags as --flag=value)")
    parser.add_argument("--shares", type=int, nargs="+", choices=SHARES, default=list(SHARES),
                        help="percent of the training images labeled")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budget", type=float, default=30.0, help="--time-budget of each run, minutes")
    parser.add_argument("--from-budget", type=float, help="every run continues SupervisedTrainer's run of this many "
                                                          "minutes at the same share (--init-from; train it first)")
    parser.add_argument("--from-seed", type=int, default=0, help="the seed of that run")
    parser.add_argument("--spacing-scale", type=float, default=DEFAULT_SPACING_SCALE,
                        help="plan at this multiple of the median pixel size (one per work folder)")
    parser.add_argument("--patch-size", type=lambda text: None if text == "plan" else [int(v) for v in text.split("x")],
                        default=DEFAULT_PATCH_SIZE, metavar="YxX | plan",
                        help="plan this 2d patch (versemi_plan_and_preprocess --patch-size 2d=YxX; one per work "
                             "folder; default 160x224, which at the default x6 shows the largest heads whole), or "
                             "'plan': the one the median image allows")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="versemi_train --batch-size of every run (default 8; 0: the plan's)")
    parser.add_argument("--network-size", choices=("auto", "plan", "cpu"), default="auto",
                        help="versemi_train --network-size (auto: the plan's CPU preset on a CPU)")
    parser.add_argument("--threads", type=int, default=1, help="threads per run (runs go one at a time)")
    parser.add_argument("--num-workers", type=int, default=0, help="loader processes per stream")
    parser.add_argument("--precision", default="auto", help="versemi_train and versemi_predict --precision (auto: "
                                                            "bf16 only where the CPU has bf16 units)")
    parser.add_argument("--mirroring", action=argparse.BooleanOptionalAction, default=True,
                        help="test-time mirroring (4 flips in 2d, 4x the prediction time; default on, as nnU-Net)")
    parser.add_argument("--lcc", action=argparse.BooleanOptionalAction, default=True,
                        help="keep each prediction's largest connected component (versemi_predict --lcc; default on: "
                             "a head is one object, and a stray region distorts the fitted ellipse)")
    parser.add_argument("--backend", default="torch", choices=("torch", "openvino", "auto"),
                        help="versemi_predict --backend (default torch: no model conversion per run)")
    parser.add_argument("--prepare-only", action="store_true", help="split, convert, plan and preprocess; print the "
                                                                    "2d plan and train nothing")
    parser.add_argument("--report", action="store_true", help="train nothing: score finished runs and write the "
                                                              "table of every finished run")
    parser.add_argument("--figure-to", type=Path, help="also copy the figure into this folder "
                                                       "(e.g. benchmarks/figures)")
    add_quiet_option(parser)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if not args.data.is_dir():
        sys.exit(f"real HC18 data not found at {args.data}: this benchmark needs ../shared beside the checkout, "
                 "or --data")
    if os.environ.get("OMP_NUM_THREADS") is None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for this process's preprocessing
    args.data, args.shares = args.data.absolute(), sorted(set(args.shares))
    work = args.work.absolute()
    specs = [parse_spec(text) for text in args.trainers]
    if args.report:
        if not (work / "split.json").is_file():
            sys.exit(f"nothing to report: {work / 'split.json'} is missing")
        write_split(work, make_split(args.data))
        raw = work / "raw" / DATASET
    else:
        raw = prepare_data(args, work)
    plan_settings = {share: plan_summary(work, share) for share in args.shares
                     if (work / "versemi_plans" / experiment(share) / "plans.json").is_file()}
    for share, summary in plan_settings.items():
        print(f"{experiment(share)} 2d plan: {describe_plan(summary)}", flush=True)
    if args.prepare_only:
        return
    host = machine()
    results: dict[int, dict[str, dict[int, dict]]] = {share: {spec.text: {} for spec in specs} for share in args.shares}
    jobs = [(share, spec, seed) for seed in args.seeds for share in args.shares for spec in specs]
    for number, (share, spec, seed) in enumerate(jobs, 1):
        left = sum(args.budget for s, p, e in jobs[number - 1:]
                   if not (run_folder(work, s, p, args.budget, e, args.from_budget) / "checkpoint.txt").is_file())
        name = f"[{number}/{len(jobs)}] {share} % {spec.label} {args.budget:g} min seed {seed}"
        result = run_and_score(args, work, raw, share, spec, seed, name, left)
        if result is not None:
            results[share][spec.text][seed] = result
            write_outputs(args, work, host, plan_settings, results, quiet=True)
    write_outputs(args, work, host, plan_settings, results)
    print(f"wrote {work / output_name(args)}.md, .json and .png")


if __name__ == "__main__":
    main()
