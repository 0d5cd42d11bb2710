"""Per-case metrics of binary masks: Dice, Jaccard, 95 % Hausdorff distance (HD95), average
surface distance (ASD), following MedPy's conventions exactly (``medpy.metric.binary``: ``dc``,
``jc``, ``hd95``, ``asd``), as the semi-supervised literature (UA-MT, BCP, ... scripts) reports.

Conventions
-----------
* Surface of a mask: the mask minus its binary erosion with connectivity 1
  (``generate_binary_structure(3, 1)``, the 6-neighbourhood) and ``border_value=0``, so an object
  touching the image border has its border voxels on the surface. This is MedPy's default.
* Directed surface distances ``A -> B``: for every surface voxel of A, the Euclidean distance to
  the nearest surface voxel of B (``scipy.ndimage.distance_transform_edt`` of the complement of
  B's surface, ``sampling`` = spacing).
* HD95: the 95th percentile (numpy's default linear interpolation) of the *concatenation* of both
  directed distance sets (prediction -> reference and reference -> prediction), as MedPy's ``hd95``.
* ASD: the mean of the directed distances prediction -> reference only, as MedPy's ``asd(pred,
  ref)`` that the literature's scripts call. It is not symmetric; ``assd`` (the mean of both
  directions' means) is the symmetric variant and is not what those papers report.
* An axis one voxel long is not a dimension: a single image stored as a one-slice volume
  ``(1, y, x)`` (HC18, any 2d dataset) is scored as the 2d image it is, with 4-connected
  surfaces and in-plane distances. Eroded in 3d, every pixel of it would count as surface.
* Units: millimetres from the image spacing (array order ``(z, y, x)``) by default; voxel units
  (``voxel_units=True``, unit spacing, MedPy's behaviour without ``voxelspacing`` and the
  convention of the LA / Pancreas-NIH benchmark tables) on request.

Why not MONAI's ``compute_hausdorff_distance``: with ``percentile=95`` it takes the percentile of
each directed set separately and returns the larger one (and works in float32), which differs from
MedPy's ``hd95`` by whole voxels on ordinary masks (e.g. 5.07 vs 3.0). MONAI's
``compute_average_surface_distance(symmetric=False)`` does agree with MedPy's ``asd`` to float32
rounding, but since the directed distances are needed for HD95 anyway, both come from the same
few lines below (float64, cropped to the union's bounding box plus one voxel, which leaves the
erosion and every distance unchanged).

Empty masks (handled explicitly, never by an exception)
------------------------------------------------------
``status`` tells which case a result is:

* ``"ok"``: both masks hold foreground; all four metrics are defined.
* ``"both_empty"``: nothing to find and nothing found: Dice 1, Jaccard 1, HD95 0, ASD 0 (under both
  conventions).
* ``"missed"``: the reference holds the target but the prediction is empty: Dice 0, Jaccard 0 and,
  under the default ``empty_convention="nan"``, HD95 = ASD = NaN (a distance to nothing is
  undefined). Summaries count such a case in the Dice/Jaccard means, average HD95/ASD over the cases
  where they are defined and report how many are not, so a missed case is never silently dropped.
* ``"false_positive_only"``: the reference is empty but the prediction is not: Dice 0, Jaccard 0,
  HD95 = ASD = NaN under ``"nan"``.

``empty_convention="literature"`` scores a missed or false-positive-only case as (0, 0, 0, 0), as
the original UA-MT/BCP evaluation scripts did (they return zeros whenever the prediction is empty).
Beware: this *rewards* a missed case with perfect distances (HD95 0, ASD 0), so distance means get
better the more cases a model misses entirely; use it only to compare with published tables, and
state it (summaries record the convention used). The original scripts also score a both-empty case
as zeros; that never happens on the LA / Pancreas test sets (every case holds the target), and it is
scored (1, 1, 0, 0) here under both conventions.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

EMPTY_CONVENTIONS = ("nan", "literature")
STATUSES = ("ok", "both_empty", "missed", "false_positive_only")
METRIC_NAMES = ("dice", "jaccard", "hd95", "asd")


@dataclass(frozen=True)
class CaseMetrics:
    """Metrics of one binary prediction against one binary reference (see module docstring)."""

    dice: float
    jaccard: float
    hd95: float
    asd: float
    status: str
    reference_voxels: int
    prediction_voxels: int

    def to_dict(self) -> dict:
        return asdict(self)


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice coefficient 2|P∩R| / (|P| + |R|); 1.0 when both are empty (MedPy's ``dc`` gives 0 there)."""
    prediction, reference = _as_bool(prediction), _as_bool(reference)
    total = int(np.count_nonzero(prediction)) + int(np.count_nonzero(reference))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(prediction & reference)) / total


def jaccard(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Jaccard index |P∩R| / |P∪R|; 1.0 when both are empty."""
    prediction, reference = _as_bool(prediction), _as_bool(reference)
    union = int(np.count_nonzero(prediction | reference))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(prediction & reference)) / union


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: ``mask`` minus its erosion with connectivity 1 (MedPy's definition)."""
    mask = _as_bool(mask)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def directed_surface_distances(source: np.ndarray, target: np.ndarray,
                               spacing: Sequence[float] | None = None) -> np.ndarray:
    """Distance from every surface voxel of ``source`` to the nearest surface voxel of ``target``.

    Both masks must hold foreground. ``spacing`` is in array order; ``None`` means voxel units.
    Equals MedPy's private ``__surface_distances(source, target, spacing, connectivity=1)``.
    """
    source, target = _as_bool(source), _as_bool(target)
    if not source.any() or not target.any():
        raise ValueError("directed_surface_distances needs foreground in both masks")
    source, target = _crop_to_union(source, target)
    sampling = None if spacing is None else np.asarray(spacing, dtype=np.float64)
    distance_to_target = ndimage.distance_transform_edt(~surface(target), sampling=sampling)
    return distance_to_target[surface(source)]


def binary_metrics(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float] | None = None,
                   voxel_units: bool = False, empty_convention: str = "nan") -> CaseMetrics:
    """Dice, Jaccard, HD95 and ASD of a binary ``prediction`` against a binary ``reference``.

    ``spacing``: voxel size in array order ``(z, y, x)`` (mm); distances are in mm unless
    ``voxel_units`` is set or ``spacing`` is None, then in voxels. Nonzero voxels are foreground.
    See the module docstring for the empty-mask conventions.
    """
    if empty_convention not in EMPTY_CONVENTIONS:
        raise ValueError(f"empty_convention must be one of {EMPTY_CONVENTIONS}, not {empty_convention!r}")
    prediction, reference = _as_bool(prediction), _as_bool(reference)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} differ in shape")
    if spacing is not None and len(spacing) != prediction.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match {prediction.ndim} dimensions")
    kept = [a for a in range(prediction.ndim) if prediction.shape[a] > 1] or [prediction.ndim - 1]
    if len(kept) < prediction.ndim:  # a single slice is a 2d image (module docstring)
        shape = [prediction.shape[a] for a in kept]
        prediction, reference = prediction.reshape(shape), reference.reshape(shape)
        spacing = None if spacing is None else [spacing[a] for a in kept]
    n_pred, n_ref = int(np.count_nonzero(prediction)), int(np.count_nonzero(reference))
    counts = {"reference_voxels": n_ref, "prediction_voxels": n_pred}
    if n_pred == 0 and n_ref == 0:
        return CaseMetrics(1.0, 1.0, 0.0, 0.0, "both_empty", **counts)
    if n_pred == 0 or n_ref == 0:
        status = "missed" if n_pred == 0 else "false_positive_only"
        distance = 0.0 if empty_convention == "literature" else math.nan
        return CaseMetrics(0.0, 0.0, distance, distance, status, **counts)
    sampling = None if voxel_units else spacing
    pred_to_ref = directed_surface_distances(prediction, reference, sampling)
    ref_to_pred = directed_surface_distances(reference, prediction, sampling)
    hd95 = float(np.percentile(np.hstack((pred_to_ref, ref_to_pred)), 95))
    asd = float(pred_to_ref.mean())
    return CaseMetrics(dice(prediction, reference), jaccard(prediction, reference), hd95, asd, "ok", **counts)


def _as_bool(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    return mask if mask.dtype == bool else mask != 0


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one voxel (clipped to the image).

    Exact for surface distances: the erosion of a voxel only looks one voxel further, a one-voxel
    margin of background (or the true image border) keeps it unchanged, and the nearest target
    surface voxel always lies inside the box.
    """
    union = a | b
    slices = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        present = np.flatnonzero(union.any(axis=other))
        slices.append(slice(max(int(present[0]) - 1, 0), int(present[-1]) + 2))
    box = tuple(slices)
    return a[box], b[box]
