"""The semi-supervised LA literature's benchmark protocol, end to end (``versemi_benchmark``).

    versemi_benchmark la-h5 SRC --labeled 8 --test-ids test_ids.txt --work WORK [training options]

On data in UA-MT's LA layout (``SRC/<ID>/mri_norm2.h5``, ``SRC/train.list``):

a. a source view in which the ids of ``--test-ids`` form test.list and the rest of train.list
   (in its order, test ids removed) forms train.list is converted with ``la-h5`` into
   ``WORK/raw/LA`` (the case folders are symlinked; SRC is never written);
b. planned with ``--labeled LA=N``: the first N ids of that train.list keep their labels, the
   rest train without labels;
c. fold ``all`` is trained (every training case; model selection uses training data only: the
   final checkpoint, never the test cases);
d. the test cases are predicted in their original geometry twice: with the pipeline's own window
   (the plan's patch, Gaussian weights, step 0.5, mirroring) and with the literature's window
   (UA-MT's ``test_all_case``: patch 112 x 112 x 80 in the h5's (x, y, z) order, i.e. (80, 112, 112)
   in (z, y, x), stride 18 / 18 / 4, softmax averaged with equal weights, no mirroring);
e. both are evaluated in voxel units (the literature's convention), with and without the largest
   connected component;
f. the four paper-style rows (Dice, Jaccard, 95HD, ASD) are printed and written, with every
   setting, to ``WORK/benchmark_summary.json``.

The literature runs at the scans' own 0.625 mm. With ``--spacing-scale S`` (a coarser plan) the
literature window is applied in the plan's grid (so it covers S times the field of view per axis);
the output says so. Evaluation is always in the original voxel grid.

Re-running with the same arguments reuses the converted data, plan, cache and trained model (a
training killed halfway is continued); a different test split, plan or training setting in the
same ``--work`` is refused rather than mixed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import read_json, write_json
from .console import add_quiet_option, progress_bar
from .errors import InputError, Problem, input_error
from .model.checkpoint import load_checkpoint
from .model.layout import output_folder
from .model.plans_view import PlansView
from .model.precision import PRECISIONS
from .training.run import parse_method

KINDS = ("la-h5",)
DATASET = "LA"
CONFIGURATION = "3d_fullres"
# UA-MT's test_all_case(patch_size=(112, 112, 80), stride_xy=18, stride_z=4), in (z, y, x)
LITERATURE_PATCH = (80, 112, 112)
LITERATURE_STRIDE = (4, 18, 18)
PIPELINE_STEP = 0.5
SUMMARY_FILE = "benchmark_summary.json"
VARIANTS = ("pipeline", "pipeline+lcc", "literature", "literature+lcc")
# training options passed through to versemi_train: (flag, TrainingConfig field)
TRAIN_OPTIONS = (("--epochs", "epochs"), ("--iterations-per-epoch", "iterations_per_epoch"),
                 ("--patch-size", "patch_size"), ("--batch-size", "batch_size"), ("--features", "features"),
                 ("--optimizer", "optimizer"), ("--lr", "lr"), ("--num-workers", "num_workers"), ("--seed", "seed"),
                 ("--time-budget", "time_budget"), ("--precision", "precision"),
                 ("--unlabeled-batch-size", "unlabeled_batch_size"))


def literature_overlap(patch: Sequence[int] = LITERATURE_PATCH, stride: Sequence[int] = LITERATURE_STRIDE) -> list[float]:
    """Per-axis overlap for MONAI's ``sliding_window_inference`` whose windows lie ``stride`` apart.

    MONAI steps by ``int(patch * (1 - overlap))``; overlap = 1 - stride / patch, less half a voxel
    of overlap, so floating-point rounding can never make that ``stride - 1``. The window positions
    are then UA-MT's: ``min(i * stride, size - patch)`` for i = 0 .. ceil((size - patch) / stride).
    """
    return [1.0 - (s + 0.5) / p for p, s in zip(patch, stride)]


class PaddedNetwork(torch.nn.Module):
    """Runs ``network`` on windows zero-padded (evenly on both sides) to a multiple of its
    downsampling and crops the logits back: lets a network whose total stride does not divide the
    literature's window (e.g. 112 with a stride of 32) predict it."""

    def __init__(self, network: torch.nn.Module, divisor: Sequence[int]):
        super().__init__()
        self.network, self.divisor = network, tuple(int(d) for d in divisor)

    def forward(self, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        extra = [(-s) % d for s, d in zip(size, self.divisor)]
        if not any(extra):
            return self.network(x, prompts)
        pad = []
        for e in reversed(extra):  # F.pad takes the last axis first
            pad += [e // 2, e - e // 2]
        logits = self.network(F.pad(x, pad), prompts)
        region = tuple(slice(e // 2, e // 2 + s) for e, s in zip(extra, size))
        return logits[(Ellipsis, *region)]


# ----- a: the source view and the conversion -----
def _h5_ids(source: Path) -> list[str]:
    from .datasets.converters.la_h5 import H5_NAME

    return sorted(p.parent.name for p in source.glob(f"*/{H5_NAME}"))


def split_source(source: Path, test_ids_file: Path) -> tuple[list[str], list[str]]:
    """(training ids in train.list order without the test ids, test ids in file order)."""
    from .datasets.converters.la_h5 import H5_NAME, read_id_list

    if not source.is_dir():
        raise input_error(source, "folder does not exist", "point to the folder holding <ID>/mri_norm2.h5 and "
                                                           "train.list (UA-MT's LA data)")
    if not test_ids_file.is_file():
        raise input_error(test_ids_file, "does not exist", "write the test case ids, one per line")
    test = read_id_list(test_ids_file)
    if not test:
        raise input_error(test_ids_file, "lists no case id", "write the test case ids, one per line")
    available = _h5_ids(source)
    if (source / "train.list").is_file():
        order = read_id_list(source / "train.list")
    else:
        listed_test = read_id_list(source / "test.list") if (source / "test.list").is_file() else []
        order = [i for i in available if i not in set(listed_test)]
    test_set = set(test)
    train = [i for i in order if i not in test_set]
    present = set(available)
    problems = [Problem(str(source / i / H5_NAME), f"is missing, but case {i!r} is listed in "
                                                   f"{'the test ids' if i in test_set else 'train.list'}",
                        "restore the case's files, or remove the id from the list")
                for i in train + test if i not in present]
    if problems:
        raise InputError(problems)
    if not train:
        raise input_error(source / "train.list", "leaves no training case once the test ids are removed",
                          "keep test ids and training ids apart")
    return train, test


def make_source_view(source: Path, folder: Path, train: list[str], test: list[str]) -> Path:
    """``folder`` with symlinks to the case folders of ``source`` and the given train/test lists."""
    folder.mkdir(parents=True, exist_ok=True)
    for case_id in train + test:
        (folder / case_id).symlink_to((source / case_id).resolve(), target_is_directory=True)
    (folder / "train.list").write_text("\n".join(train) + "\n", encoding="utf-8")
    (folder / "test.list").write_text("\n".join(test) + "\n", encoding="utf-8")
    return folder


def convert_split(source: Path, raw_dataset: Path, train: list[str], test: list[str],
                  show_progress: bool = True, kind: str = "la-h5") -> bool:
    """Convert the split into ``raw_dataset`` (True), or reuse it where it already holds exactly this
    split (False); a different split there is refused. ``kind``: ``la-h5`` (UA-MT's layout, the
    training order is ``train``) or ``msd`` (a Decathlon task folder: the training order is its
    dataset.json's, which must be ``train`` once the test cases are removed)."""
    from .datasets.converters.la_h5 import convert_la_h5
    from .datasets.converters.msd import convert_msd
    from .datasets.layout import load_dataset

    if (raw_dataset / "dataset.json").is_file():
        existing = load_dataset(raw_dataset)
        same = (existing.meta.get("case_order") == train
                and sorted(c.case_id for c in existing.test_cases()) == sorted(test)
                and sorted(c.case_id for c in existing.labeled_cases()) == sorted(train))
        if same:
            return False
        raise input_error(raw_dataset, "holds another train/test split (converted by an earlier run with other "
                                       "test ids or source)",
                          "use another --work folder for this split, or delete that one")
    if kind == "msd":
        convert_msd(source, raw_dataset, overwrite=raw_dataset.exists(), show_progress=show_progress, test_ids=test)
        if load_dataset(raw_dataset).meta.get("case_order") != train:
            raise input_error(source / "dataset.json", "lists its training cases in another order than the split's",
                              "give the training ids in dataset.json's order")
        return True
    with tempfile.TemporaryDirectory(prefix=".source-view-", dir=raw_dataset.parent.parent) as tmp:
        view = make_source_view(source, Path(tmp) / "la_h5", train, test)
        convert_la_h5(view, raw_dataset, overwrite=raw_dataset.exists(), show_progress=show_progress)
    return True


# ----- c: training -----
@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _train_argv(args, experiment: str) -> list[str]:
    argv = [CONFIGURATION, "all", "-e", experiment, "-tr", args.trainer, "--device", args.device]
    for flag, name in TRAIN_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            argv += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    if args.method:
        argv += ["--method", args.method]
    if args.no_augmentation:
        argv.append("--no-augmentation")
    return argv


def _check_trained(checkpoint: Path, plans: dict, args) -> None:
    """A final checkpoint from an earlier run is reused only if it was trained on these plans with
    these settings."""
    from .inference.predictor import _canonical

    state = load_checkpoint(checkpoint, "cpu")
    differences = []
    if _canonical(state["plans"]) != _canonical(plans):
        differences.append("plans")
    config = state["config"]
    for flag, name in TRAIN_OPTIONS:
        value = getattr(args, name)
        if value is not None and config.get(name) != value:
            differences.append(f"{flag} {config.get(name)} (requested {value})")
    if args.no_augmentation and config.get("augmentation", {}).get("enabled", True):
        differences.append("--no-augmentation")
    if args.method and any(config.get("method", {}).get(k) != v for k, v in parse_method(args.method).items()):
        differences.append("--method")
    if differences:
        raise input_error(checkpoint, f"was trained with other settings ({'; '.join(differences)})",
                          "use another --work folder for these settings, or delete that model folder")


def train_fold_all(args, experiment: str, plans: dict, work: Path) -> tuple[Path, float | None]:
    """Train fold ``all`` (or continue / reuse it); returns its final checkpoint and the seconds spent."""
    from .training.run import train

    with _environment(VERSEMI_RESULTS=str(work / "results"), VERSEMI_PLANS=str(work / "versemi_plans"),
                      VERSEMI_RAW=str(work / "raw")):
        folder = output_folder(experiment, args.trainer, CONFIGURATION, "all")
        final = folder / "checkpoint_final.pth"
        if final.is_file():
            _check_trained(final, plans, args)
            return final, None
        argv = _train_argv(args, experiment) + ["--plans-root", str(work / "versemi_plans")]
        if (folder / "checkpoint_latest.pth").is_file():
            argv.append("--continue")
        started = time.time()
        train(argv)
        return final, time.time() - started


# ----- d, e: prediction and evaluation -----
def _window_note(plan_spacing: Sequence[float], original_spacing: Sequence[float]) -> str | None:
    if np.allclose(plan_spacing, original_spacing, rtol=1e-3):
        return None
    factors = "x".join(f"{p / o:g}" for p, o in zip(plan_spacing, original_spacing))
    return (f"the literature window is applied in the plan's grid (spacing {', '.join(f'{s:g}' for s in plan_spacing)} "
            f"mm (z, y, x), not the literature's {', '.join(f'{s:g}' for s in original_spacing)} mm): its "
            f"{'x'.join(map(str, LITERATURE_PATCH))} voxels cover {factors} times the literature's field of view")


def predict_test_cases(ensemble, raw_dataset: Path, predictions: Path) -> dict:
    """Predict every test case with both windows; writes ``predictions/<variant>/<case>.nii.gz``."""
    from .datasets.io import write_image
    from .datasets.layout import load_dataset
    from .inference.postprocessing import largest_connected_component
    from .inference.predictor import Ensemble, FoldModel, predict_case, resolve_prompt

    prompt = resolve_prompt(ensemble.plans, DATASET)
    padded = []
    for model in ensemble.models:
        divisor = getattr(model.network, "divisor", (1, 1, 1))
        network = model.network
        if any(p % d for p, d in zip(LITERATURE_PATCH, divisor)):
            network = PaddedNetwork(model.network, divisor)
        padded.append(FoldModel(model.fold, model.checkpoint, model.trainer, network, model.patch_size))
    literature = Ensemble(ensemble.plans, ensemble.configuration, padded, ensemble.device)
    windows = {
        "pipeline": dict(ensemble=ensemble, kwargs=dict(step=PIPELINE_STEP, mirroring=True)),
        "literature": dict(ensemble=literature, kwargs=dict(mirroring=False, patch_size=list(LITERATURE_PATCH),
                                                           overlap=literature_overlap(), blend="constant")),
    }
    seconds = {name: 0.0 for name in windows}
    cases = load_dataset(raw_dataset).test_cases()
    for case in progress_bar(cases, desc="predicting test cases", unit="case"):
        for name, window in windows.items():
            started = time.time()
            result = predict_case(window["ensemble"], case.images, prompt, **window["kwargs"])
            seconds[name] += time.time() - started
            mask = result.mask.astype(np.uint8)
            write_image(mask, result.geometry, predictions / name / f"{case.case_id}.nii.gz")
            kept = largest_connected_component(mask).astype(np.uint8)
            write_image(kept, result.geometry, predictions / f"{name}+lcc" / f"{case.case_id}.nii.gz")
    return {"cases": [c.case_id for c in cases], "seconds": seconds,
            "padded_to_divisor": [list(getattr(m.network, "divisor", ())) for m in padded
                                  if isinstance(m.network, PaddedNetwork)]}


# ----- the whole protocol -----
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="versemi_benchmark",
                                description="The LA literature's protocol end to end: convert with a given test "
                                            "split, plan with the first N training cases labeled, train fold 'all', "
                                            "predict the test cases with the pipeline's and the literature's "
                                            "sliding window, evaluate in voxel units with and without the largest "
                                            "connected component, print the paper-style rows.")
    p.add_argument("kind", choices=KINDS, help="source layout (la-h5: UA-MT's <ID>/mri_norm2.h5 with train.list)")
    p.add_argument("source", type=Path, help="folder in that layout")
    p.add_argument("--labeled", type=int, required=True, help="the first N ids of train.list keep their labels "
                                                              "(8 = LA 10 %%, 16 = LA 20 %%)")
    p.add_argument("--test-ids", type=Path, required=True, help="file of test case ids, one per line")
    p.add_argument("--work", type=Path, default=Path("versemi_benchmark"),
                   help="work folder: raw/, versemi_plans/, results/, predictions/, evaluation/ and "
                        f"{SUMMARY_FILE} (default ./versemi_benchmark)")
    p.add_argument("-e", "--experiment", help="experiment name (default LA-<N>labeled, plus the spacing scale)")
    p.add_argument("-tr", "--trainer", default="VerSemiTrainer")
    p.add_argument("--spacing-scale", type=float, default=1.0,
                   help="plan at this multiple of the target spacing (2 = half resolution, for CPU runs)")
    p.add_argument("--memory-gb", type=float, default=8.0, help="GPU memory budget for the plan's patch and batch")
    p.add_argument("-np", "--num-processes", type=int, default=2, help="preprocessing worker processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--empty", choices=("nan", "literature"), default="nan",
                   help="scoring of a missed case (see versemi_evaluate --empty)")
    add_quiet_option(p)
    t = p.add_argument_group("training (passed to versemi_train; default: the plan's and the trainer's)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--iterations-per-epoch", type=int)
    t.add_argument("--patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"))
    t.add_argument("--batch-size", type=int)
    t.add_argument("--features", type=int, nargs="+")
    t.add_argument("--optimizer", choices=("sgd", "adam"))
    t.add_argument("--lr", type=float)
    t.add_argument("--num-workers", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--time-budget", type=float, metavar="MINUTES", help="fit the whole schedule into this many minutes")
    t.add_argument("--precision", choices=PRECISIONS)
    t.add_argument("--unlabeled-batch-size", type=int)
    t.add_argument("--method", help="method settings as JSON")
    t.add_argument("--no-augmentation", action="store_true")
    return p


def run_benchmark(args) -> dict:
    from .evaluation import evaluate_folders, format_table_row
    from .inference.predictor import load_models
    from .plans.experiment import ExperimentRequest, plan_and_preprocess
    from .plans.planner import PlanSettings

    if args.labeled < 1:
        raise input_error(f"--labeled {args.labeled}", "must be at least 1", "give e.g. --labeled 8")
    if args.spacing_scale <= 0:
        raise input_error(f"--spacing-scale {args.spacing_scale}", "must be positive", "use 1 (or 2 for CPU runs)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise input_error(f"--device {args.device}", "CUDA is not available here", "use --device cpu")
    if args.method:
        parse_method(args.method)
    work = args.work.absolute()
    source = args.source.absolute()
    started = time.time()

    # a. convert
    train_ids, test_ids = split_source(source, args.test_ids)
    if args.labeled > len(train_ids):
        raise input_error(f"--labeled {args.labeled}", f"only {len(train_ids)} training case(s) remain once the test "
                                                       "ids are removed", f"give a number from 1 to {len(train_ids)}")
    raw_dataset = work / "raw" / DATASET
    raw_dataset.parent.mkdir(parents=True, exist_ok=True)
    converted = convert_split(source, raw_dataset, train_ids, test_ids)
    print(f"data: {raw_dataset} ({'converted' if converted else 'reused'}): {args.labeled} labeled, "
          f"{len(train_ids) - args.labeled} unlabeled, {len(test_ids)} test case(s)")

    # b. plan and preprocess
    experiment = args.experiment or (f"{DATASET}-{args.labeled}labeled"
                                     + (f"_spacing{args.spacing_scale:g}x" if args.spacing_scale != 1 else ""))
    request = ExperimentRequest([DATASET], work / "raw", work / "versemi_plans", experiment=experiment,
                                labeled_limits={DATASET: args.labeled}, num_processes=args.num_processes,
                                settings=PlanSettings(memory_gb=args.memory_gb, spacing_scale=args.spacing_scale))
    plan_summary = plan_and_preprocess(request)
    plans = read_json(plan_summary["plans"])
    view = PlansView(plans)
    plan, patch_size = view.dataset_plan(DATASET), view.configuration(CONFIGURATION)["patch_size"]
    print(f"plan: {plan_summary['plans']} (target spacing {plan['target_spacing']} mm, patch {patch_size})")

    # c. train fold all
    checkpoint, train_seconds = train_fold_all(args, experiment, plans, work)
    print(f"model: {checkpoint} ({'trained' if train_seconds is not None else 'reused'}; fold all, final checkpoint)")

    used = load_checkpoint(checkpoint, "cpu")["config"]
    used = {k: used.get(k) for k in ("epochs", "iterations_per_epoch", "patch_size", "batch_size", "features",
                                     "optimizer", "lr", "seed", "method", "time_budget", "budget", "precision")}

    # d. predict with both windows
    ensemble = load_models(checkpoint, device=args.device)
    predictions = work / "predictions"
    prediction = predict_test_cases(ensemble, raw_dataset, predictions)
    from .datasets.layout import load_dataset
    from .datasets.io import read_label
    original_spacing = read_label(load_dataset(raw_dataset).test_cases()[0].label)[1].spacing_zyx
    note = _window_note(plan["target_spacing"], original_spacing)
    model_patch = ensemble.models[0].patch_size

    # e. evaluate
    labels_ts = raw_dataset / "labelsTs"
    variants = {}
    for name in VARIANTS:
        summary = evaluate_folders(labels_ts, predictions / name, voxel_units=True, labels=[1],
                                   empty_convention=args.empty, output_dir=work / "evaluation" / name)
        variants[name] = {"row": format_table_row(summary, 1), "mean": summary["mean"]["1"],
                          "std": summary["std"]["1"], "counts": summary["counts"]["1"],
                          "summary": summary["files"].get("json"), "predictions": str(predictions / name)}

    descriptions = {
        "pipeline": f"pipeline window: patch {'x'.join(map(str, model_patch))} (z, y, x), Gaussian, step "
                    f"{PIPELINE_STEP}, mirroring",
        "literature": f"literature window: patch {'x'.join(map(str, LITERATURE_PATCH))} (z, y, x) = 112x112x80 "
                      f"(x, y, z), stride {'/'.join(map(str, LITERATURE_STRIDE[::-1]))} (x/y/z), constant, "
                      "no mirroring",
    }
    for name in VARIANTS:
        window = name.split("+")[0]
        variants[name]["window"] = descriptions[window]
        variants[name]["lcc"] = name.endswith("+lcc")
        variants[name]["predict_seconds"] = round(prediction["seconds"][window], 1)
    result = {
        "protocol": "semi-supervised LA literature (UA-MT): first N of train.list labeled, rest unlabeled; "
                    "per-case Dice, Jaccard, 95HD, ASD in voxel units (MedPy conventions)",
        "source": str(source), "work": str(work), "experiment": experiment,
        "labeled": args.labeled, "labeled_cases": train_ids[:args.labeled],
        "unlabeled_cases": train_ids[args.labeled:], "test_cases": test_ids,
        "plan": {"file": plan_summary["plans"], "target_spacing": plan["target_spacing"],
                 "spacing_scale": args.spacing_scale, "patch_size": patch_size},
        "training": {"trainer": args.trainer, "fold": "all", "checkpoint": str(checkpoint),
                     "model_selection": "final checkpoint (training data only)",
                     "options": {name: getattr(args, name) for _, name in TRAIN_OPTIONS if getattr(args, name) is not None},
                     "config": used,
                     "seconds": None if train_seconds is None else round(train_seconds, 1)},
        "windows": {"pipeline": {"patch_size": model_patch, "step": PIPELINE_STEP, "blend": "gaussian",
                                 "mirroring": True},
                    "literature": {"patch_size": list(LITERATURE_PATCH), "stride": list(LITERATURE_STRIDE),
                                   "overlap": literature_overlap(), "blend": "constant", "mirroring": False,
                                   "grid": "plan" if note else "original (0.625 mm)",
                                   "padded_to_divisor": prediction["padded_to_divisor"]}},
        "distance_units": "voxels", "empty_convention": args.empty,
        "notes": [n for n in (note,) if n],
        "variants": variants,
        "seconds": round(time.time() - started, 1),
    }
    write_json(result, work / SUMMARY_FILE)
    return result


def format_rows(result: dict) -> list[str]:
    width = max(len(v) for v in VARIANTS)
    return [f"{name:<{width}}  {result['variants'][name]['row']}" for name in VARIANTS]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run_benchmark(args)
    print(f"\n{DATASET}: {result['labeled']} labeled / {len(result['unlabeled_cases'])} unlabeled, "
          f"{len(result['test_cases'])} test case(s); {result['training']['trainer']} fold all, final checkpoint; "
          f"distances in voxels, empty convention '{result['empty_convention']}'")
    for name in ("pipeline", "literature"):
        print(f"  {name}: {result['variants'][name]['window']}")
    for note in result["notes"]:
        print(f"  note: {note}")
    for row in format_rows(result):
        print(row)
    print(f"wrote {Path(result['work']) / SUMMARY_FILE}")
    return 0
