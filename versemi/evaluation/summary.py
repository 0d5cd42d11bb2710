"""Evaluate a folder of predicted segmentations against a folder of reference labels.

Files pair by case name: ``CASE`` + any supported ending (``.nii.gz``, ``.nii``, ``.nrrd``,
``.mha``), so ``case1.nrrd`` is scored against ``case1.nii.gz``. Every label value in
``labels`` (default: every nonzero value present in any reference) is evaluated as a binary mask
in every case, with the metrics and empty-mask conventions of :mod:`versemi.evaluation.metrics`.

Written into the output folder (default ``PREDICTIONS/summary``), each atomically:

* ``summary.json``: settings (units, empty convention), the structures' names (``label_names``, see
  :mod:`versemi.evaluation.structure_names`), per case per label metrics, per label means
  (Dice/Jaccard over all cases; HD95/ASD over the cases where they are defined), population standard
  deviations and counts (cases, ok, both_empty, missed, false_positive_only, undefined distances).
  NaN is written as ``null``.
* ``summary.csv``: one row per case and label (an empty cell where a distance is undefined).
* ``summary.png``: a box plot per metric (one box per label, cases as dots).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_path, write_json
from ..datasets.io import SUPPORTED_ENDINGS, Geometry, file_ending, read_label
from ..errors import InputError, Problem, input_error
from .metrics import EMPTY_CONVENTIONS, METRIC_NAMES, STATUSES, CaseMetrics, binary_metrics
from .foreign_claims import read_label_map_table, summarize_claims
from .head_circumference import case_circumferences
from .head_circumference import summarize as summarize_circumferences
from .structure_names import structure_names, structure_title

SUMMARY_FILES = ("summary.json", "summary.csv", "summary.png")
_DISPLAY = {"dice": "Dice", "jaccard": "Jaccard", "hd95": "95HD", "asd": "ASD"}


def find_cases(folder: str | Path) -> dict[str, Path]:
    """Case name -> file for the image files directly in ``folder`` (hidden and other files skipped)."""
    folder = Path(folder)
    cases: dict[str, Path] = {}
    duplicates = []
    for path in sorted(folder.iterdir()):
        ending = file_ending(path)
        if not ending or path.name.startswith(".") or not path.is_file():
            continue
        case = path.name[: -len(ending)]
        if case in cases:
            duplicates.append(Problem(str(path), f"case '{case}' also stored as {cases[case].name}",
                                      "keep one file per case in the folder"))
            continue
        cases[case] = path
    if duplicates:
        raise InputError(duplicates)
    return cases


def evaluate_folders(reference_dir: str | Path, prediction_dir: str | Path, voxel_units: bool = False,
                     labels: Iterable[int] | None = None, empty_convention: str = "nan",
                     output_dir: str | Path | None = None, write: bool = True, dataset: str | None = None,
                     head_circumference: bool = False) -> dict:
    """Score every reference case against its prediction; write and return the summary.

    ``labels``: label values to evaluate (default: every nonzero value found in the references).
    ``voxel_units``: distances in voxels instead of mm. ``empty_convention``: ``"nan"`` or
    ``"literature"`` (see :mod:`versemi.evaluation.metrics`). ``head_circumference``: also the
    circumference of an ellipse fitted to each 2D mask and its absolute difference from the
    reference's (``head_circumference`` module; HC18). ``output_dir``: where the
    ``summary.*`` files go (default ``prediction_dir/summary``); ``write=False`` writes nothing.

    Raises InputError for a missing folder, no reference cases, missing predictions (all listed
    at once), or a prediction whose shape or geometry differs from its reference.
    """
    reference_dir, prediction_dir = Path(reference_dir), Path(prediction_dir)
    if empty_convention not in EMPTY_CONVENTIONS:
        raise input_error(f"--empty {empty_convention}", "unknown empty-mask convention",
                          f"use one of: {', '.join(EMPTY_CONVENTIONS)}")
    requested = _check_labels(labels)
    for folder, role in ((reference_dir, "reference labels"), (prediction_dir, "predictions")):
        if not folder.is_dir():
            raise input_error(folder, f"folder of {role} does not exist", "check the path")
    references = find_cases(reference_dir)
    if not references:
        raise input_error(reference_dir, "holds no reference label files",
                          f"point -r at the folder of label files ({', '.join(SUPPORTED_ENDINGS)}), e.g. labelsTs")
    predictions = find_cases(prediction_dir)
    _check_pairs(references, predictions, prediction_dir)
    ignored = sorted(set(predictions) - set(references))
    label_map = read_label_map_table(prediction_dir, reference_dir, dataset)
    claims: dict[str, dict[str, float]] = {}

    per_case: list[dict] = []
    found_labels: set[int] = set()
    predicted_labels: set[int] = set()
    for case, ref_path in references.items():
        pred_path = predictions[case]
        reference, ref_geometry = read_label(ref_path)
        prediction, pred_geometry = read_label(pred_path)
        problem = _geometry_problem(pred_path, ref_path, prediction.shape, pred_geometry,
                                    reference.shape, ref_geometry)
        if problem:
            raise InputError(problem)
        if label_map is not None:
            claims[case] = label_map.claims(prediction)
            prediction = label_map.own_labels(prediction)
        present = set(np.unique(reference).tolist()) - {0}
        found_labels |= present
        case_labels = requested if requested is not None else present | (set(np.unique(prediction).tolist()) - {0})
        metrics = {label: binary_metrics(prediction == label, reference == label, ref_geometry.spacing_zyx,
                                         voxel_units=voxel_units, empty_convention=empty_convention)
                   for label in sorted(case_labels)}
        predicted_labels |= set(np.unique(prediction).tolist()) - {0}
        per_case.append({"case": case, "reference": str(ref_path), "prediction": str(pred_path),
                         "metrics": metrics})
        if head_circumference:
            spacing = (1.0, 1.0) if voxel_units else ref_geometry.spacing_zyx[1:]
            per_case[-1]["head_circumference"] = case_circumferences(prediction, reference, spacing,
                                                                     sorted(case_labels | (requested or set())), ref_path)
    label_set = sorted(requested if requested is not None else found_labels)
    if not label_set:
        raise input_error(reference_dir, "the reference labels hold no foreground (only 0) in any case",
                          "pass the label values to evaluate with --labels, or check the reference folder")
    # A label absent from a case's reference and prediction was not computed there: both empty.
    both_empty = CaseMetrics(1.0, 1.0, 0.0, 0.0, "both_empty", 0, 0)
    for entry in per_case:
        entry["metrics"] = {str(label): _clean(entry["metrics"].get(label, both_empty)) for label in label_set}

    output_dir = Path(output_dir) if output_dir is not None else prediction_dir / "summary"
    summary = {
        "reference_dir": str(reference_dir),
        "prediction_dir": str(prediction_dir),
        "units": "voxels" if voxel_units else "mm",
        "empty_convention": empty_convention,
        "conventions": ("MedPy: surface = mask minus its erosion (connectivity 1); HD95 = 95th percentile of both "
                        "directed surface distance sets together (medpy hd95); ASD = mean distance prediction -> "
                        "reference (medpy asd); Dice/Jaccard means over all cases, HD95/ASD means over the cases "
                        "where they are defined (NaN/null when a mask is empty under the 'nan' convention)"),
        "labels": label_set,
        "label_names": {str(v): name for v, name in structure_names(reference_dir,
                                                                     None if label_map else prediction_dir).items()
                        if v in label_set},
        "num_cases": len(per_case),
        "mean": {},
        "std": {},
        "counts": {},
        "ignored_predictions": ignored,
        "foreign_claims": summarize_claims(claims, label_map) if label_map is not None else None,
        "labels_not_evaluated": sorted((found_labels | predicted_labels) - set(label_set)),
        "files": {name.split(".")[1]: str(output_dir / name) for name in SUMMARY_FILES} if write else {},
        "cases": per_case,
    }
    for label in label_set:
        key = str(label)
        rows = [entry["metrics"][key] for entry in per_case]
        summary["mean"][key], summary["std"][key] = {}, {}
        for metric in METRIC_NAMES:
            values = np.array([np.nan if r[metric] is None else r[metric] for r in rows], dtype=np.float64)
            defined = values[~np.isnan(values)]
            summary["mean"][key][metric] = float(defined.mean()) if defined.size else None
            summary["std"][key][metric] = float(defined.std()) if defined.size else None
        counts = {"cases": len(rows)}
        counts.update({status: sum(r["status"] == status for r in rows) for status in STATUSES})
        counts["hd95_undefined"] = sum(r["hd95"] is None for r in rows)
        counts["asd_undefined"] = sum(r["asd"] is None for r in rows)
        summary["counts"][key] = counts
    if head_circumference:
        for entry in per_case:  # a label neither mask holds in a case: no circumference either
            entry["head_circumference"] = {str(label): entry["head_circumference"].get(
                str(label), {"predicted": None, "reference": None, "abs_difference": None}) for label in label_set}
        summary["head_circumference"] = summarize_circumferences(per_case, label_set)
    if write:
        write_summary(summary, output_dir)
    return summary


def write_summary(summary: dict, output_dir: str | Path) -> dict[str, Path]:
    """Write ``summary.json``, ``summary.csv`` and ``summary.png`` into ``output_dir`` atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name.split(".")[1]: output_dir / name for name in SUMMARY_FILES}
    write_json(summary, paths["json"])
    table = summary_table(summary)
    with atomic_path(paths["csv"], suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
    _plot(summary, table, paths["png"])
    return paths


def summary_table(summary: dict):
    """A pandas DataFrame with one row per case and label (NaN where a distance is undefined)."""
    import pandas as pd

    rows = []
    for entry in summary["cases"]:
        for label, m in entry["metrics"].items():
            rows.append({"case": entry["case"], "label": int(label),
                         **{k: (np.nan if m[k] is None else m[k]) for k in METRIC_NAMES},
                         "status": m["status"], "reference_voxels": m["reference_voxels"],
                         "prediction_voxels": m["prediction_voxels"]})
    columns = ["case", "label", *METRIC_NAMES, "status", "reference_voxels", "prediction_voxels"]
    return pd.DataFrame(rows, columns=columns)


def format_table_row(summary: dict, label: int | str) -> str:
    """Paper-style row of the means for one label: ``Dice 89.01 | Jaccard 80.30 | 95HD 6.20 | ASD 1.90``.

    Dice and Jaccard in %, distances in the summary's units; ``n/a`` where no case defines a mean.
    """
    key = str(label)
    if key not in summary["mean"]:
        raise KeyError(f"label {label} was not evaluated (labels: {summary['labels']})")
    mean = summary["mean"][key]
    parts = []
    for metric in METRIC_NAMES:
        value = mean[metric]
        if value is None:
            text = "n/a"
        else:
            text = f"{100 * value:.2f}" if metric in ("dice", "jaccard") else f"{value:.2f}"
        parts.append(f"{_DISPLAY[metric]} {text}")
    return " | ".join(parts)


def _check_labels(labels: Iterable[int] | None) -> set[int] | None:
    if labels is None:
        return None
    values = list(labels)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0]
    if bad or not values:
        raise input_error(f"--labels {' '.join(map(str, values))}",
                          "labels must be one or more positive integers (0 is background)",
                          "list the foreground label values to evaluate, e.g. --labels 1 2")
    return {int(v) for v in values}


def _check_pairs(references: dict[str, Path], predictions: dict[str, Path], prediction_dir: Path) -> None:
    """Every reference case needs a prediction with the same shape and geometry; report all at once."""
    problems = []
    endings = "/".join(SUPPORTED_ENDINGS)
    for case, ref_path in references.items():
        if case not in predictions:
            problems.append(Problem(str(prediction_dir / f"{case}{file_ending(ref_path)}"),
                                    f"no prediction for reference case '{case}' (looked for {case}{{{endings}}})",
                                    "predict this case into the prediction folder, or remove its reference "
                                    "from the reference folder if it is not part of the test set"))
            continue
        ref_header, pred_header = _header(ref_path), _header(predictions[case])
        if ref_header and pred_header:
            problem = _geometry_problem(predictions[case], ref_path, pred_header[0], pred_header[1],
                                        ref_header[0], ref_header[1])
            if problem:
                problems.append(problem)
    if problems:
        raise InputError(problems)


def _header(path: Path) -> tuple[tuple[int, ...], Geometry] | None:
    """Shape (z, y, x) and geometry from the file header; None when unreadable (reading reports it)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    if reader.GetDimension() != 3:
        return None
    return (tuple(reversed(reader.GetSize())),
            Geometry(tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection())))


def _geometry_problem(pred_path: Path, ref_path: Path, pred_shape, pred_geometry: Geometry,
                      ref_shape, ref_geometry: Geometry) -> Problem | None:
    fix = (f"write the prediction on the voxel grid of its reference {ref_path.name} (same shape, spacing, "
           "origin and direction), e.g. resample it back to the original image before evaluating")
    if tuple(pred_shape) != tuple(ref_shape):
        return Problem(str(pred_path), f"shape (z, y, x) {tuple(pred_shape)} differs from the reference's "
                                       f"{tuple(ref_shape)} ({ref_path})", fix)
    if not pred_geometry.matches(ref_geometry):
        return Problem(str(pred_path), "geometry differs from the reference's "
                                       f"(spacing {_round(pred_geometry.spacing)} vs {_round(ref_geometry.spacing)}, "
                                       f"origin {_round(pred_geometry.origin)} vs {_round(ref_geometry.origin)}, "
                                       f"or direction) ({ref_path})", fix)
    return None


def _round(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(float(v), 4) for v in values)


def _clean(metrics: CaseMetrics) -> dict:
    """JSON-ready dict of one result: NaN becomes None."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.to_dict().items()}


def _plot(summary: dict, table, target: Path) -> None:
    """Box plot per metric (one box per label, each case a dot), written atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = summary["labels"]
    units = summary["units"]
    figure = Figure(figsize=(3.2 * len(METRIC_NAMES), 3.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(METRIC_NAMES))
    for ax, metric in zip(axes, METRIC_NAMES):
        data = [table.loc[table["label"] == label, metric].dropna().to_numpy() for label in labels]
        positions = list(range(1, len(labels) + 1))
        if any(len(d) for d in data):
            ax.boxplot([d if len(d) else [np.nan] for d in data], positions=positions, widths=0.5,
                       showfliers=False)
        for position, values in zip(positions, data):
            jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(len(values))
            ax.plot(position + jitter, values, "o", markersize=3, alpha=0.6)
        ax.set_xticks(positions)
        ax.set_xticklabels([structure_title(summary["label_names"], label) for label in labels])
        unit = "" if metric in ("dice", "jaccard") else f" ({units})"
        undefined = sum(summary["counts"][str(label)].get(f"{metric}_undefined", 0) for label in labels)
        title = f"{_DISPLAY[metric]}{unit}" + (f"\n{undefined} undefined" if undefined else "")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle(f"{summary['num_cases']} cases, empty convention '{summary['empty_convention']}'",
                    fontsize=10)
    figure.tight_layout()
    with atomic_path(target, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=100)
