"""The head circumference of 2D masks (HC18's clinical figure): each predicted and reference mask
gets an ellipse fitted to its outline (``versemi.ellipse``), and a case scores the absolute
difference of the two circumferences, in the summary's units (mm, or pixels with voxel units)."""
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
    """Per label: the predicted and reference circumferences and their absolute difference
    (None where a mask is empty or no ellipse fits it)."""
    prediction, reference = as_2d(prediction, reference_path), as_2d(reference, reference_path)
    result = {}
    for label in labels:
        predicted = head_circumference(prediction == label, spacing_yx)
        true = head_circumference(reference == label, spacing_yx)
        difference = None if predicted is None or true is None else abs(predicted - true)
        result[str(label)] = {"predicted": predicted, "reference": true, "abs_difference": difference}
    return result


def summarize(per_case: list[dict], labels: Iterable[int]) -> dict[str, dict]:
    """Per label: the mean and std of the absolute differences over the cases where both are
    defined, and how many cases are not (an empty prediction is never dropped silently)."""
    summary = {}
    for label in labels:
        values = [entry["head_circumference"][str(label)]["abs_difference"] for entry in per_case]
        defined = np.array([v for v in values if v is not None], dtype=np.float64)
        summary[str(label)] = {"mean_abs_difference": float(defined.mean()) if defined.size else None,
                               "std_abs_difference": float(defined.std()) if defined.size else None,
                               "cases": len(values), "undefined": len(values) - int(defined.size)}
    return summary
