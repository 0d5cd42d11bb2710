"""Structures claimed in the wrong scans.

A model trained on several datasets predicts, in one label map, every structure of every dataset
(``versemi_predict -p all``, which writes ``labels.json`` beside the maps). A structure of another
dataset can never be in a scan of this dataset's anatomy (a pancreas in an atrium MRI), so every
voxel given to one is an error a reader sees at once. This module finds the scans' own dataset,
puts the map's own structures back on the dataset's label values for scoring, and measures the
share of each case's voxels given to each structure of another dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import input_error
from .structure_names import _read


@dataclass(frozen=True)
class LabelMapTable:
    """A label map's ``labels.json``, split into the cases' own dataset's structures and the others'."""

    dataset: str
    own: dict[int, int]       # map value -> the dataset's own label value
    foreign: dict[int, str]   # map value -> DATASET/LABEL of another dataset

    def own_labels(self, prediction: np.ndarray) -> np.ndarray:
        """The map with the dataset's own label values, and 0 where another dataset's structure is."""
        result = np.zeros_like(prediction)
        for value, own_value in self.own.items():
            result[prediction == value] = own_value
        return result

    def claims(self, prediction: np.ndarray) -> dict[str, float]:
        """Share of the case's voxels given to each structure of another dataset."""
        size = max(1, prediction.size)
        return {name: float((prediction == value).sum()) / size for value, name in self.foreign.items()}


def read_label_map_table(prediction_dir: Path, reference_dir: Path, dataset: str | None = None) -> LabelMapTable | None:
    """The table of a label map of several datasets' structures, or None when the predictions are
    not one (no ``labels.json``, or all its structures from one dataset).

    The cases' dataset is ``dataset``, else the reference folder's (``RAW/<dataset>/labelsTs``).

    Raises:
        InputError: a label map of several datasets whose cases' dataset is not among them.
    """
    table = _read(Path(prediction_dir) / "labels.json")
    entries = table.get("labels") if isinstance(table, dict) else None
    if not isinstance(entries, list):
        return None
    entries = [e for e in entries if isinstance(e, dict) and {"value", "dataset", "label", "label_value"} <= e.keys()]
    datasets = list(dict.fromkeys(str(e["dataset"]) for e in entries))
    if len(datasets) < 2:
        return None
    guess = dataset or Path(reference_dir).parent.name
    if guess not in datasets:
        raise input_error(Path(prediction_dir) / "labels.json",
                          f"holds structures of {', '.join(datasets)}; the cases' own dataset "
                          f"{guess!r} is not among them",
                          "name the dataset the reference cases come from with --dataset")
    own = {int(e["value"]): int(e["label_value"]) for e in entries if e["dataset"] == guess}
    foreign = {int(e["value"]): f"{e['dataset']}/{e['label']}" for e in entries if e["dataset"] != guess}
    return LabelMapTable(guess, own, foreign)


def summarize_claims(per_case: dict[str, dict[str, float]], table: LabelMapTable) -> dict:
    """Per structure of another dataset: the mean and largest share of a case's voxels, and in how
    many cases it was claimed at all; per case the shares (and their total)."""
    names = list(table.foreign.values())
    structures = {}
    for name in names:
        shares = np.array([claims[name] for claims in per_case.values()], dtype=np.float64)
        structures[name] = {"mean": float(shares.mean()) if shares.size else 0.0,
                            "max": float(shares.max()) if shares.size else 0.0,
                            "cases_claimed": int((shares > 0).sum())}
    return {"dataset": table.dataset, "definition": "share of each case's voxels that the label map gives to a "
                                                    "structure of another dataset",
            "structures": structures,
            "cases": {case: {**claims, "total": float(sum(claims.values()))} for case, claims in per_case.items()}}
