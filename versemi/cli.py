"""Console entry points: parse arguments, call one function, print the outcome.

Bad input raises ``InputError``; every entry point prints it (file, problem, fix) and exits 2.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path
from typing import Callable

from . import paths
from .console import add_quiet_option, is_quiet, set_quiet
from .errors import InputError, input_error


def _entry_point(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        quiet = is_quiet()  # a --quiet given to this call must not silence a caller that goes on (tests, scripts)
        try:
            code = main(argv) or 0
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            code = 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            code = 130
        finally:
            set_quiet(quiet)
        if argv is None:
            sys.exit(code)
        return code
    return wrapper


@_entry_point
def make_synthetic_main(argv: list[str] | None = None) -> int:
    from .datasets.synthetic import SyntheticConfig, make_synthetic

    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(prog="versemi_make_synthetic",
                                     description="Write the two seeded demo datasets (DemoLA: MRI-like, "
                                                 "DemoPancreas: CT-like) in the raw layout.")
    parser.add_argument("-o", "--output", type=Path, default=None, help="raw root (default: $VERSEMI_RAW or "
                                                                         "$VERSEMI_ROOT/raw)")
    parser.add_argument("--num-labeled", type=int, default=defaults.num_labeled)
    parser.add_argument("--num-unlabeled", type=int, default=defaults.num_unlabeled)
    parser.add_argument("--num-test", type=int, default=defaults.num_test)
    parser.add_argument("--shape-la", type=int, nargs=3, default=list(defaults.shape_la), metavar=("X", "Y", "Z"))
    parser.add_argument("--shape-pancreas", type=int, nargs=3, default=list(defaults.shape_pancreas),
                        metavar=("X", "Y", "Z"))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("-np", "--num-processes", type=int, default=2)
    parser.add_argument("--overwrite", action="store_true", help="replace existing demo dataset folders")
    add_quiet_option(parser)
    args = parser.parse_args(argv)
    config = SyntheticConfig(num_labeled=args.num_labeled, num_unlabeled=args.num_unlabeled, num_test=args.num_test,
                             shape_la=tuple(args.shape_la), shape_pancreas=tuple(args.shape_pancreas), seed=args.seed)
    written = make_synthetic(args.output or paths.raw_root(), config, overwrite=args.overwrite,
                             num_processes=args.num_processes)
    for folder in written:
        print(f"wrote {folder}")
    return 0


@_entry_point
def convert_main(argv: list[str] | None = None) -> int:
    from .datasets.converters import CONVERTERS, convert

    parser = argparse.ArgumentParser(prog="versemi_convert",
                                     description="Convert a public dataset's own layout into the raw layout.")
    parser.add_argument("kind", choices=sorted(CONVERTERS), help="source layout")
    parser.add_argument("source", type=Path, help="folder in the source layout")
    parser.add_argument("-o", "--output", type=Path, required=True, help="dataset folder to write, e.g. RAW/LA")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                        help="voxel spacing in mm where the source stores none (la-h5: default 0.625 isotropic)")
    parser.add_argument("--labels", type=Path, help="pancreas-nih: folder of label00NN.nii.gz files")
    add_quiet_option(parser)
    args = parser.parse_args(argv)
    options = {k: v for k, v in (("spacing", tuple(args.spacing) if args.spacing else None),
                                 ("labels", args.labels)) if v is not None}
    written = convert(args.kind, args.source, args.output, overwrite=args.overwrite, **options)
    print(f"wrote {written}")
    return 0


def _parse_limits(values: list[str]) -> dict[str, int]:
    limits = {}
    for value in values:
        name, _, number = value.partition("=")
        if not number.isdigit():
            raise input_error(f"--labeled {value}", "expected NAME=N", "write e.g. --labeled LA=8")
        limits[name] = int(number)
    return limits


def _parse_spacing_scale(values: list[str]) -> float | dict[str, float]:
    """``F`` for every dataset, or ``NAME=F`` per dataset."""
    def factor(text: str, entry: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not value > 0:
            raise input_error(f"--spacing-scale {entry}", "needs a positive factor",
                              "write e.g. --spacing-scale 2, or --spacing-scale LA=2")
        return value

    if len(values) == 1 and "=" not in values[0]:
        return factor(values[0], values[0])
    scales = {}
    for entry in values:
        name, sep, text = entry.partition("=")
        if not sep or not name:
            raise input_error(f"--spacing-scale {entry}", "mixes one factor for all with NAME=F entries",
                              "write one factor (--spacing-scale 2) or one NAME=F per dataset")
        scales[name] = factor(text, entry)
    return scales


def _parse_patch_size(values: list[str]) -> dict[str, list[int]]:
    """``CONFIGURATION=AxB[xC]`` entries, e.g. ``2d=160x224``."""
    sizes = {}
    for entry in values:
        name, sep, text = entry.partition("=")
        try:
            sizes[name] = [int(v) for v in text.lower().split("x")]
        except ValueError:
            sep = ""
        if not sep or not name:
            raise input_error(f"--patch-size {entry}", "expected CONFIGURATION=AxB[xC] in voxels",
                              "write e.g. --patch-size 2d=160x224 or 3d_fullres=64x128x128")
    return sizes


@_entry_point
def plan_and_preprocess_main(argv: list[str] | None = None) -> int:
    from .plans import known_absent
    from .plans.experiment import ExperimentRequest, plan_and_preprocess, verify
    from .plans.planner import PlanSettings

    parser = argparse.ArgumentParser(prog="versemi_plan_and_preprocess",
                                     description="Check the datasets, fingerprint them, write ONE joint plan and "
                                                 "fill the preprocessing cache.")
    parser.add_argument("-d", "--datasets", nargs="+", required=True, help="dataset names, e.g. LA Pancreas")
    parser.add_argument("-e", "--experiment", help="experiment name (default: from the dataset names)")
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--verify-only", action="store_true", help="only run the integrity check; write nothing")
    parser.add_argument("--labeled", nargs="+", default=[], metavar="NAME=N",
                        help="use only the first N labeled cases of a dataset (case order of its dataset.json); "
                             "the rest are used as unlabeled, e.g. --labeled LA=8")
    parser.add_argument("--known-absent", nargs="+", metavar="NAME=OTHER[,OTHER/LABEL]",
                        help="other datasets' structures that never occur in a dataset's images, e.g. "
                             "--known-absent LA=Hippocampus Hippocampus=LA, or 'all' (no dataset shows another's "
                             "structures); replaces the known_absent entry of the named datasets' dataset.json. "
                             "Training learns them absent there; without a declaration they stay unknown")
    parser.add_argument("--memory-gb", type=float, default=8.0, help="GPU memory budget for patch and batch size")
    parser.add_argument("--architecture", choices=("unet", "vnet"), default="unet")
    parser.add_argument("--spacing-scale", nargs="+", default=["1"], metavar="F | NAME=F",
                        help="plan at this multiple of the target spacing (2 = half resolution, for CPU runs); "
                             "per dataset: --spacing-scale LA=2 (datasets not named keep 1)")
    parser.add_argument("--patch-per-dataset", action="store_true",
                        help="give a dataset whose images are smaller than the joint plan's patch a patch of its own "
                             "(then a batch holds one dataset: versemi_train --dataset-batches; with the default SGD "
                             "such joint runs stalled, with --optimizer adam they learnt but claimed more of the other "
                             "datasets' scans: benchmarks/RESULTS.md)")
    parser.add_argument("--patch-size", nargs="+", default=[], metavar="CONFIGURATION=AxB[xC]",
                        help="plan this patch (voxels at the planned spacing, (y, x) in 2d, (z, y, x) in 3d) instead "
                             "of the largest one that the median image and the memory budget allow, e.g. "
                             "--patch-size 2d=160x224: for structures larger than the median image shows (late fetal "
                             "heads in HC18, benchmarks/RESULTS.md); the batch is then sized to it")
    parser.add_argument("-c", "--configurations", nargs="+", metavar="NAME",
                        help="the planned configurations whose cache to fill, e.g. -c 3d_fullres 2d (default: "
                             "3d_fullres, or 2d for datasets of single images, which get no 3d configuration)")
    parser.add_argument("--no-preprocess", action="store_true", help="write fingerprints and plans only")
    parser.add_argument("--overwrite-plans", action="store_true", help="replace an existing, different plans.json")
    parser.add_argument("--raw", type=Path, help="raw root (default: $VERSEMI_RAW or $VERSEMI_ROOT/raw)")
    parser.add_argument("--plans-root", type=Path, help="(default: $VERSEMI_PLANS or $VERSEMI_ROOT/versemi_plans)")
    add_quiet_option(parser)
    args = parser.parse_args(argv)
    request = ExperimentRequest(
        dataset_names=args.datasets, raw_root=args.raw or paths.raw_root(), plans_root=args.plans_root or paths.plans_root(),
        experiment=args.experiment, labeled_limits=_parse_limits(args.labeled), num_processes=args.num_processes,
        settings=PlanSettings(memory_gb=args.memory_gb, architecture=args.architecture,
                              spacing_scale=_parse_spacing_scale(args.spacing_scale),
                              patch_per_dataset=args.patch_per_dataset,
                              patch_size=_parse_patch_size(args.patch_size)),
        overwrite_plans=args.overwrite_plans, configurations=args.configurations,
        known_absent=known_absent.parse_cli(args.known_absent) if args.known_absent else None)
    if args.verify_only:
        verify(request)
        print(f"verified {', '.join(args.datasets)}: no problems found")
        return 0
    summary = plan_and_preprocess(request, preprocess=not args.no_preprocess)
    print(f"experiment {summary['experiment']}: plans {summary['plans']}")
    for cache in summary.get("caches", []):
        print(f"cache {cache['folder']}: {cache['preprocessed']} case(s) preprocessed, "
              f"{cache['already_cached']} already up to date")
    return 0


@_entry_point
def train_main(argv: list[str] | None = None) -> int:
    from .training.run import train

    return train(argv)


@_entry_point
def evaluate_main(argv: list[str] | None = None) -> int:
    from .evaluation import EMPTY_CONVENTIONS, evaluate_folders, format_table_row

    parser = argparse.ArgumentParser(prog="versemi_evaluate",
                                     description="Score a folder of predicted segmentations against reference "
                                                 "labels: Dice, Jaccard, 95th-percentile Hausdorff distance, "
                                                 "average surface distance (MedPy conventions) per case and label; "
                                                 "writes summary.json, summary.csv and summary.png.")
    parser.add_argument("-r", "--reference", type=Path, required=True, help="folder of reference label files")
    parser.add_argument("-p", "--predictions", type=Path, required=True, help="folder of predicted label files "
                                                                              "(same case names)")
    parser.add_argument("-o", "--output", type=Path, default=None, help="folder for the summary files "
                                                                        "(default: PREDICTIONS/summary)")
    parser.add_argument("--voxel-units", action="store_true",
                        help="distances in voxels (the LA/Pancreas literature's convention) instead of mm")
    parser.add_argument("--labels", type=int, nargs="+", default=None,
                        help="label values to evaluate (default: every nonzero value in the references)")
    parser.add_argument("--empty", choices=EMPTY_CONVENTIONS, default="nan",
                        help="missed / false-positive-only cases: 'nan' (default) leaves HD95/ASD undefined and "
                             "counts them; 'literature' scores them (0, 0, 0, 0) like the UA-MT scripts")
    parser.add_argument("--images", type=Path, default=None,
                        help="folder of the images (CASE_0000.ext) for the overlay pictures (default: imagesTs "
                             "beside a labelsTs reference folder)")
    parser.add_argument("--no-overlays", action="store_true", help="no overlay pictures")
    parser.add_argument("--dataset", help="for label maps of several datasets' structures (labels.json beside the "
                                          "predictions): the dataset the cases come from (default: the reference "
                                          "folder's, RAW/DATASET/labelsTs)")
    parser.add_argument("--head-circumference", action="store_true",
                        help="2D images (HC18): also the circumference of an ellipse fitted to each predicted and "
                             "reference mask, and their absolute difference")
    args = parser.parse_args(argv)
    summary = evaluate_folders(args.reference, args.predictions, voxel_units=args.voxel_units, labels=args.labels,
                               empty_convention=args.empty, output_dir=args.output, dataset=args.dataset,
                               head_circumference=args.head_circumference)
    print(f"{summary['num_cases']} case(s), distances in {summary['units']}, empty convention '{args.empty}'")
    for label in summary["labels"]:
        counts = summary["counts"][str(label)]
        notes = ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in ("missed", "false_positive_only",
                                                                          "both_empty") if counts[k])
        print(f"label {label}: {format_table_row(summary, label)}" + (f"   ({notes})" if notes else ""))
    for label, figures in (summary.get("head_circumference") or {}).items():
        notes = ([f"{figures['missed']} with no head found, counted as circumference 0"] if figures["missed"] else []) \
            + ([f"{figures['undefined']} unscored: no reference circumference"] if figures["undefined"] else [])
        counted = f" ({'; '.join(notes)})" if notes else ""
        mean = "n/a" if figures["mean_abs_difference"] is None else \
            f"{figures['mean_abs_difference']:.2f} ± {figures['std_abs_difference']:.2f} {summary['units']}"
        print(f"label {label}: head circumference |predicted - reference| {mean} over {figures['cases']} "
              f"case(s){counted}")
    claims = summary["foreign_claims"]
    if claims is not None:
        for name, figures in claims["structures"].items():
            print(f"{name} claimed in {claims['dataset']} scans: {100 * figures['mean']:.3f} % of the voxels on "
                  f"average, at most {100 * figures['max']:.3f} %, in {figures['cases_claimed']} of "
                  f"{summary['num_cases']} case(s)")
    if summary["ignored_predictions"]:
        print(f"note: {len(summary['ignored_predictions'])} prediction(s) without a reference ignored: "
              f"{', '.join(summary['ignored_predictions'])}")
    if summary["labels_not_evaluated"]:
        print(f"note: label value(s) {summary['labels_not_evaluated']} present but not evaluated")
    for path in summary["files"].values():
        print(f"wrote {path}")
    if not args.no_overlays:
        from .evaluation.overlays import images_beside, write_evaluation_overlays

        images = args.images or images_beside(args.reference)
        if images is None:
            print("no overlays: pass --images with the folder of the images (CASE_0000.ext)")
        elif not images.is_dir():
            raise input_error(f"--images {images}", "is not a folder", "give the folder of the images")
        else:
            folder = write_evaluation_overlays(summary, images, Path(summary["files"]["json"]).parent / "overlays")
            print(f"wrote overlays of the best, median and worst case: {folder / 'index.html'}")
    return 0


def add_model_selection(parser: argparse.ArgumentParser, folds_help: str, members: bool = False) -> None:
    """The options that choose trained models, the same for every command that loads them
    (``members``: also ``--member``, one network of a trainer that trains several)."""
    from .model.layout import CHECKPOINT_KINDS
    from .model.plans_view import DEFAULT_CONFIGURATION

    group = parser.add_argument_group("model selection")
    group.add_argument("-e", "--experiment", help="experiment (default: the single planned one)")
    group.add_argument("-tr", "--trainer", default="VerSemiTrainer", help="trainer class (default VerSemiTrainer)")
    group.add_argument("-c", "--configuration", default=DEFAULT_CONFIGURATION)
    group.add_argument("-f", "--folds", nargs="+", help=folds_help)
    group.add_argument("--checkpoint", choices=CHECKPOINT_KINDS, default="final")
    group.add_argument("--plans-root", type=Path, help="where to look for the planned experiment (default: "
                                                       "$VERSEMI_PLANS or $VERSEMI_ROOT/versemi_plans)")
    if members:
        group.add_argument("--member", help="one network of a trainer that trains several, by name (e.g. "
                                            "unet or vnet); default: the mean of all of them, like folds")


ENSEMBLE_FOLDS = "folds to ensemble: 0 .. 4 or all (default: every fold folder present)"


@_entry_point
def predict_main(argv: list[str] | None = None) -> int:
    import torch

    from .inference.cpu_runtime import BACKENDS, default_backend, use_backend
    from .inference.predictor import load_models, predict_cases, resolve_prompts
    from .inference.sliding_window import inference_dtype
    from .model.layout import find_experiment_dir
    from .model.precision import PRECISIONS

    parser = argparse.ArgumentParser(prog="versemi_predict",
                                     description="Segment images with the trained folds of an experiment (one "
                                                 "prompt: a 0/1 mask; several: one label map and labels.json), "
                                                 "written in each input's own file format and geometry.")
    parser.add_argument("-i", "--input", type=Path, nargs="+", required=True,
                        help="a folder of CASE_0000.ext files (one per channel), or image files")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for CASE.ext (not the input folder)")
    parser.add_argument("-p", "--prompt", nargs="+",
                        help="the task(s): a dataset (its single label), DATASET:LABEL / DATASET/LABEL, several of "
                             "them, or all (the default: every structure of the experiment in one label map)")
    parser.add_argument("--from-dataset", metavar="DATASET",
                        help="the images come from this dataset of the experiment: structures it declares absent "
                             "from its images (known_absent, versemi_plan_and_preprocess) are not predicted, and "
                             "labels.json says so")
    add_model_selection(parser, ENSEMBLE_FOLDS, members=True)
    parser.add_argument("--no-mirroring", action="store_true", help="no test-time mirroring (8x faster)")
    parser.add_argument("--step", type=float, default=0.5, help="sliding-window step as a fraction of the patch "
                                                                "(0.5: windows overlap by half)")
    parser.add_argument("--lcc", action="store_true", help="keep only the largest connected component")
    parser.add_argument("--postprocessing", choices=("auto",), default=None,
                        help="auto: keep the largest connected component where cross-validation found it helps "
                             "(the decision versemi_find_postprocessing wrote for this prompt)")
    parser.add_argument("--save-probabilities", action="store_true", help="also write CASE_prob.npz (float32)")
    parser.add_argument("--overlays", action="store_true", help="also draw each case with its predicted contours "
                                                                "(OUT/overlays/CASE.png and index.html)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the network's arithmetic (default auto: bf16 on CUDA and on CPUs with bf16 units, "
                             "AMX or AVX512-BF16; fp32 on other CPUs, which only emulate bf16)")
    parser.add_argument("--backend", choices=BACKENDS, default=default_backend(),
                        help="what runs the network (default $VERSEMI_PREDICT_BACKEND, else auto: OpenVINO on a CPU "
                             "where it is installed, pip install 'versemi[openvino]', and the converted model agrees "
                             "with torch; torch otherwise). Converted models are cached beside each checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_quiet_option(parser)
    args = parser.parse_args(argv)
    if not 0 < args.step <= 1:
        raise input_error(f"--step {args.step}", "must lie in (0, 1]", "use e.g. 0.5 (nnU-Net's default)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise input_error(f"--device {args.device}", "CUDA is not available here", "use --device cpu")
    experiment_dir = find_experiment_dir(args.experiment, args.plans_root)
    dtype = inference_dtype(args.precision, torch.device(args.device))  # refuses fp16 on a CPU before any work
    ensemble = load_models(experiment_dir, args.folds, args.trainer, args.configuration, args.checkpoint, args.device,
                           member=args.member)
    ensemble.precision = args.precision
    backend = use_backend(ensemble, args.backend)
    prompts = resolve_prompts(ensemble.plans, args.prompt)
    left_out = []
    if args.from_dataset:
        from .inference.prompt_names import asks_all, prompts_for_dataset

        prompts, absent = prompts_for_dataset(ensemble.plans, prompts, args.from_dataset, not asks_all(args.prompt))
        left_out = [(p, f"{args.from_dataset} declares it absent from its images (known_absent)") for p in absent]
        for prompt, why in left_out:
            print(f"not predicted: {prompt['dataset']}/{prompt['label']}: {why}")
    lcc = {p["index"] for p in prompts} if args.lcc else set()
    if args.postprocessing == "auto":
        from .inference.find_postprocessing import load_lcc_decision

        if args.lcc:
            raise input_error("--lcc --postprocessing auto", "contradict each other",
                              "give --lcc to always keep the largest component, or --postprocessing auto to follow "
                              "the cross-validation decision")
        for prompt in prompts:
            decision = load_lcc_decision(experiment_dir, args.trainer, ensemble.configuration, prompt)
            if decision["apply_lcc"]:
                lcc.add(prompt["index"])
            print(f"postprocessing auto, {prompt['dataset']}/{prompt['label']}: largest connected component "
                  f"{'on' if decision['apply_lcc'] else 'off'} (cross-validation Dice "
                  f"{100 * decision['dice_with']:.2f} with, {100 * decision['dice_without']:.2f} without, "
                  f"{decision['cases']} case(s); {decision['file']})")
    names = ", ".join(f"{p['dataset']}/{p['label']}" for p in prompts)
    members = sorted({m for m in ensemble.members if m is not None})
    folds = ", ".join(dict.fromkeys(ensemble.folds)) + (f" (members {', '.join(members)})" if members else "")
    print(f"{experiment_dir.name}: {args.trainer}__{ensemble.configuration} fold(s) {folds}, "
          f"prompt{'s' if len(prompts) > 1 else ''} {names}, on {ensemble.device} "
          f"({'fp32' if dtype is None else str(dtype).replace('torch.', '')}); {backend}")
    written = predict_cases(args.input, args.output, prompts, ensemble, step=args.step, mirroring=not args.no_mirroring,
                            lcc=bool(lcc) if len(prompts) == 1 else lcc, save_probabilities=args.save_probabilities,
                            overwrite=args.overwrite, left_out=left_out)
    table = f" and {Path(args.output) / 'labels.json'} (the label values)" if len(prompts) > 1 else ""
    print(f"wrote {len(written)} segmentation(s) to {args.output}{table}")
    if args.overlays:
        from .evaluation.overlays import write_prediction_overlays
        from .inference.label_map import label_table
        from .inference.predictor import find_cases

        cases = {c.output_path(args.output): c for c in find_cases(args.input, ensemble.in_channels)}
        if len(prompts) > 1:
            names = {v: f"{p['dataset']}/{p['label']}" for p, v in zip(prompts, label_table(prompts).values)}
        else:
            names = {1: f"{prompts[0]['dataset']}/{prompts[0]['label']}"}
        folder = write_prediction_overlays([(cases[path].case_id, cases[path].files[0], path) for path in written],
                                           names, Path(args.output) / "overlays")
        print(f"wrote overlays: {folder / 'index.html'}")
    return 0


@_entry_point
def find_postprocessing_main(argv: list[str] | None = None) -> int:
    import torch

    from .inference.find_postprocessing import find_postprocessing, format_decisions
    from .model.layout import find_experiment_dir

    parser = argparse.ArgumentParser(prog="versemi_find_postprocessing",
                                     description="From cross-validation, decide per prompt whether keeping the "
                                                 "largest connected component does not lower the mean Dice "
                                                 "(nnU-Net's rule); writes postprocessing.json for versemi_predict "
                                                 "--postprocessing auto.")
    add_model_selection(parser, "cross-validation folds 0 .. 4 (default: every trained one)")
    parser.add_argument("--raw", type=Path, help="raw root holding the datasets (default: $VERSEMI_RAW or "
                                                 "$VERSEMI_ROOT/raw)")
    parser.add_argument("--no-mirroring", action="store_true", help="no test-time mirroring (8x faster)")
    parser.add_argument("--step", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_quiet_option(parser)
    args = parser.parse_args(argv)
    if not 0 < args.step <= 1:
        raise input_error(f"--step {args.step}", "must lie in (0, 1]", "use e.g. 0.5 (nnU-Net's default)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise input_error(f"--device {args.device}", "CUDA is not available here", "use --device cpu")
    experiment_dir = find_experiment_dir(args.experiment, args.plans_root)
    result = find_postprocessing(experiment_dir, args.trainer, args.configuration, args.folds, args.checkpoint,
                                 args.raw, args.device, args.step, not args.no_mirroring)
    print(f"{experiment_dir.name}: {args.trainer}__{args.configuration}, folds {', '.join(result['folds'])}, "
          f"{len(result['cases'])} validation case(s) in their original geometry")
    print(format_decisions(result))
    print(f"wrote {result['file']}")
    return 0


@_entry_point
def benchmark_main(argv: list[str] | None = None) -> int:
    from .benchmark_protocol import main

    return main(argv)


@_entry_point
def export_bundle_main(argv: list[str] | None = None) -> int:
    from .bundles.export import BUNDLE_PRECISIONS, BUNDLE_VERSION, export_bundle

    parser = argparse.ArgumentParser(prog="versemi_export_bundle",
                                     description="Export prompts of a trained experiment as a MONAI bundle that "
                                                 "runs without versemi (python -m monai.bundle run --config_file "
                                                 "OUT/configs/inference.json --dataset_dir IN --output_dir PRED); "
                                                 "one prompt: a 0/1 mask, several: one label map and labels.json, "
                                                 "as versemi_predict. The prompts' datasets must share "
                                                 "normalization and target spacing (one preprocessing pipeline).")
    parser.add_argument("-p", "--prompt", nargs="+",
                        help="the task(s): a dataset (its single label), DATASET:LABEL / DATASET/LABEL, several of "
                             "them, or all (the default: every structure of the experiment in one label map)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="bundle folder (default: $VERSEMI_BUNDLES/<experiment>_<dataset>_<label> for one "
                             "prompt, <experiment>_<dataset> for all of a dataset's, <experiment>_all for all)")
    add_model_selection(parser, ENSEMBLE_FOLDS, members=True)
    parser.add_argument("--version", default=BUNDLE_VERSION, help=f"bundle version (default {BUNDLE_VERSION})")
    parser.add_argument("--authors", default="VerSemi contributors", help="metadata.json 'authors'")
    parser.add_argument("--copyright", default="Copyright (c) VerSemi contributors", help="metadata.json 'copyright'")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    parser.add_argument("--precision", choices=list(BUNDLE_PRECISIONS), default="fp32",
                        help="what the bundle computes in on every machine (default fp32; bf16 pays only on CPUs "
                             "with bf16 units and on GPUs); recorded in its metadata and model card")
    args = parser.parse_args(argv)
    folder = export_bundle(args.output, args.prompt, args.experiment, args.folds, args.trainer, args.configuration,
                           args.checkpoint, overwrite=args.overwrite, version=args.version, authors=args.authors,
                           copyright_=args.copyright, plans_root=args.plans_root, member=args.member,
                           precision=args.precision)
    print(f"wrote {folder} ({args.precision})")
    if (folder / "configs" / "labels.json").is_file():
        print(f"one label map; its values: {folder / 'configs' / 'labels.json'}")
    print(f"run it: python -m monai.bundle run --config_file {folder / 'configs' / 'inference.json'} "
          "--dataset_dir IN --output_dir OUT")
    return 0
