"""The head circumference of 2D masks (HC18's clinical figure): each predicted and reference mask
gets an ellipse fitted to its outline (``versemi.ellipse``), and a case scores the absolute
difference of the two circumferences, in the summary's units (mm, or pixels with voxel units).

A prediction that yields no circumference (an empty mask, or one no ellipse fits) where the
reference has one is a head not found: it measures 0, so its difference is the whole reference
circumference. Leaving it out of the mean would rank a model that finds nothing above one that
finds the wrong thing; the summary counts such cases as ``missed``. A case whose reference has no
circumference cannot be scored (``undefined``)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..ellipse import head_circumference
from ..errors import input_error


def as_2d(array: np.ndarray, path: Path) -> np.ndarray:
    """A (1, Y, X) or (Y, X) label array as (Y, X); an input error for a volume of several slices."""
    if array.ndim == 3 and array.shape[0] == 1:
        return array[0]
    if array.ndim == 2:
        return array
    raise input_error(path, f"holds {array.shape[0]} slices; a head circumference is measured on 2D images",
                      "leave --head-circumference out for volumes")


def case_circumferences(prediction: np.ndarray, reference: np.ndarray, spacing_yx: Sequence[float],
                        labels: Iterable[int], reference_path: Path) -> dict[str, dict]:
    """Per label: the predicted and reference circumferences (None where a mask is empty or no
    ellipse fits it) and their absolute difference: the reference's circumference where the
    prediction has none, None where the reference has none."""
    prediction, reference = as_2d(prediction, reference_path), as_2d(reference, reference_path)
    result = {}
    for label in labels:
        predicted = head_circumference(prediction == label, spacing_yx)
        true = head_circumference(reference == label, spacing_yx)
        difference = None if true is None else abs((predicted or 0.0) - true)
        result[str(label)] = {"predicted": predicted, "reference": true, "abs_difference": difference}
    return result


def summarize(per_case: list[dict], labels: Iterable[int]) -> dict[str, dict]:
    """Per label: the mean and std of the absolute differences over the cases whose reference has
    a circumference (a head not found counts with the whole circumference), how many of those the
    prediction missed, and how many cases could not be scored."""
    summary = {}
    for label in labels:
        entries = [entry["head_circumference"][str(label)] for entry in per_case]
        defined = np.array([e["abs_difference"] for e in entries if e["abs_difference"] is not None], dtype=np.float64)
        summary[str(label)] = {"mean_abs_difference": float(defined.mean()) if defined.size else None,
                               "std_abs_difference": float(defined.std()) if defined.size else None,
                               "cases": len(entries), "undefined": len(entries) - int(defined.size),
                               "missed": sum(e["predicted"] is None and e["reference"] is not None for e in entries)}
    return summary
