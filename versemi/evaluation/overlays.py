"""Overlay pictures for a look at results without a viewer: the image with the reference and the
predicted contours on the three orthogonal slices through each structure.

``versemi_evaluate`` draws the best, the median and the worst case by mean Dice (with the Dice
in the title); ``versemi_predict --overlays`` draws every case, without a reference. Each
folder also gets ``index.html``, the pictures in one page.
"""
from __future__ import annotations

import html
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_path
from ..datasets.io import Geometry
from .structure_names import structure_title

REFERENCE_COLOR, PREDICTION_COLOR = "#2ca02c", "#d62728"
VIEWS = (("axial", 0), ("coronal", 1), ("sagittal", 2))


def _window(image: np.ndarray) -> tuple[float, float]:
    """Display range: the 0.5th to 99.5th percentile of the nonzero voxels."""
    values = image[image != 0] if np.any(image != 0) else image.ravel()
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(max(high, low + 1e-6))


def _centre(masks: Sequence[np.ndarray], shape) -> list[int]:
    """The voxel at the centre of mass of the union of the masks (the volume's centre if empty)."""
    union = np.zeros(shape, bool)
    for mask in masks:
        if mask is not None:
            union |= mask
    if not union.any():
        return [s // 2 for s in shape]
    return [int(round(c)) for c in np.argwhere(union).mean(0)]


def _slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(array, index, axis=axis)


def draw_overlay(image: np.ndarray, geometry: Geometry, labels: dict[int, str], prediction: np.ndarray,
                 reference: np.ndarray | None, title: str, path: Path) -> Path:
    """``overlay_figure`` written to ``path`` as PNG, atomically."""
    figure = overlay_figure(image, geometry, labels, prediction, reference, title)
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=80, format="png")
    return path


def overlay_figure(image: np.ndarray, geometry: Geometry, labels: dict[int, str], prediction: np.ndarray,
                   reference: np.ndarray | None, title: str):
    """One row per structure (label value -> name), one column per orthogonal view through its
    centre (a single image, one slice deep: that slice alone); the image in grey, the reference
    contour green, the prediction red dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    low, high = _window(image)
    spacing = geometry.spacing_zyx
    rows = list(labels.items())
    views = VIEWS[:1] if image.shape[0] == 1 else VIEWS  # across one slice there is nothing to see
    figure = Figure(figsize=(10 if len(views) == 3 else 5, 3.4 * len(rows) + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    for row, (value, name) in enumerate(rows):
        predicted = prediction == value
        known = reference == value if reference is not None else None
        centre = _centre([predicted, known], image.shape)
        for column, (view, axis) in enumerate(views):
            ax = figure.add_subplot(len(rows), len(views), row * len(views) + column + 1)
            kept = [a for a in range(3) if a != axis]  # (rows, columns) of the slice
            aspect = spacing[kept[0]] / spacing[kept[1]]
            ax.imshow(_slice(image, axis, centre[axis]), cmap="gray", vmin=low, vmax=high, aspect=aspect,
                      origin="lower" if axis != 0 else "upper", interpolation="nearest")
            for mask, color, style in ((known, REFERENCE_COLOR, "solid"), (predicted, PREDICTION_COLOR, "dashed")):
                if mask is not None and _slice(mask, axis, centre[axis]).any():
                    ax.contour(_slice(mask, axis, centre[axis]).astype(float), levels=[0.5], colors=color,
                               linewidths=1.2, linestyles=style)
            ax.set_title(f"{name}: {view} slice {centre[axis]}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Line2D([], [], color=PREDICTION_COLOR, linestyle="dashed", label="prediction")]
    if reference is not None:
        handles.insert(0, Line2D([], [], color=REFERENCE_COLOR, label="reference"))
    figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9)
    figure.suptitle(textwrap.fill(title, 100), fontsize=11)  # a long title wraps rather than leave the picture
    return figure


def write_index(entries: list[tuple[str, Path]], folder: Path, heading: str) -> Path:
    """``index.html``: each picture under its caption, in order."""
    body = "\n".join(f'<h3>{html.escape(caption)}</h3>\n<img src="{html.escape(path.name)}" style="max-width:100%">'
                     for caption, path in entries)
    path = folder / "index.html"
    with atomic_path(path, suffix=".html") as tmp:
        Path(tmp).write_text(f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(heading)}"
                             f"</title></head>\n<body>\n<h2>{html.escape(heading)}</h2>\n{body}\n</body></html>\n", encoding="utf-8")
    return path


def pick_best_median_worst(scores: dict[str, float]) -> list[tuple[str, str]]:
    """(role, case) for the best, median and worst case by score (fewer with fewer cases)."""
    ranked = sorted(scores, key=lambda case: (-scores[case], case))
    picks = [("best", ranked[0]), ("median", ranked[len(ranked) // 2]), ("worst", ranked[-1])]
    seen, out = set(), []
    for role, case in picks:
        if case not in seen:
            seen.add(case)
            out.append((role, case))
    return out


def image_file(images_dir: Path, case: str) -> Path | None:
    """The case's first channel in a folder of ``CASE_0000.ext`` (nnU-Net) or ``CASE.ext`` files."""
    from ..datasets.io import SUPPORTED_ENDINGS

    for ending in SUPPORTED_ENDINGS:
        for name in (f"{case}_0000{ending}", f"{case}{ending}"):
            if (images_dir / name).is_file():
                return images_dir / name
    return None


def images_beside(reference_dir: Path) -> Path | None:
    """``imagesTs`` for a ``labelsTs`` folder (``imagesTr`` for ``labelsTr``), where it exists."""
    name = reference_dir.name
    if name.startswith("labels") and (reference_dir.parent / ("images" + name[len("labels"):])).is_dir():
        return reference_dir.parent / ("images" + name[len("labels"):])
    return None


def write_evaluation_overlays(summary: dict, images_dir: Path, output_dir: Path) -> Path:
    """Overlays of the best, median and worst case by mean Dice over the labels, and their index.
    For a label map of several datasets (``summary["foreign_claims"]``), the case with the most
    voxels given to another dataset's structure is drawn too, and each such structure present in a
    drawn case gets its own row (prediction only: it has no reference in these scans)."""
    from ..datasets.io import read_image, read_label
    from .foreign_claims import read_label_map_table

    claims = summary.get("foreign_claims")
    label_map = (read_label_map_table(Path(summary["prediction_dir"]), Path(summary["reference_dir"]),
                                      claims["dataset"]) if claims else None)
    scores = {entry["case"]: float(np.mean([m["dice"] for m in entry["metrics"].values()]))
              for entry in summary["cases"]}
    picks = pick_best_median_worst(scores)
    if claims:
        most = max(claims["cases"], key=lambda case: (claims["cases"][case]["total"], case))
        if claims["cases"][most]["total"] > 0 and most not in {case for _, case in picks}:
            picks.append(("most claimed by other datasets", most))
    entries = []
    for role, case in picks:
        entry = next(e for e in summary["cases"] if e["case"] == case)
        source = image_file(images_dir, case)
        if source is None:
            continue
        image, geometry = read_image([source])
        reference, _ = read_label(entry["reference"])
        prediction, _ = read_label(entry["prediction"])
        labels = {int(label): structure_title(summary["label_names"], label) for label in entry["metrics"]}
        dice = ", ".join(f"{labels[int(label)]} {100 * m['dice']:.1f}" for label, m in entry["metrics"].items())
        title = f"{case} ({role} of {len(scores)} by Dice): Dice {dice}"
        if label_map is not None:
            shown = label_map.own_labels(prediction).astype(np.int64)
            offset = int(max(label_map.own.values(), default=0)) + int(max(label_map.foreign)) + 1
            for value, name in label_map.foreign.items():
                share = claims["cases"][case][name]
                if share > 0:  # a value no reference holds, so the row shows the prediction alone
                    shown[prediction == value] = offset + value
                    labels[offset + value] = f"{name} (another dataset's structure)"
                    title += f"; {name} claims {100 * share:.2f} % of the voxels"
            prediction = shown
        path = draw_overlay(image[0], geometry, labels, prediction, reference, title,
                            output_dir / f"{role.replace(' ', '_')}_{case}.png")
        entries.append((title, path))
    write_index(entries, output_dir, f"{summary['prediction_dir']} against {summary['reference_dir']}")
    return output_dir


def write_prediction_overlays(cases: list[tuple[str, Path, Path]], labels: dict[int, str], output_dir: Path) -> Path:
    """One overlay per predicted case ((case id, first channel file, prediction file)), and the index."""
    from ..datasets.io import read_image, read_label

    entries = []
    for case, source, predicted in cases:
        image, geometry = read_image([source])
        prediction, _ = read_label(predicted)
        present = {v: n for v, n in labels.items() if np.any(prediction == v)} or labels
        title = f"{case}: prediction"
        entries.append((title, draw_overlay(image[0], geometry, present, prediction, None, title,
                                            output_dir / f"{case}.png")))
    write_index(entries, output_dir, f"predictions in {output_dir.parent}")
    return output_dir
