"""The names of the structures an evaluation scores, as their datasets call them.

A ``labelsTr`` / ``labelsTs`` folder's ``dataset.json`` (one level up) names the dataset's label
values (e.g. hippocampus: 1 Anterior, 2 Posterior); ``labels.json``, written by versemi_predict next
to a label map of several structures, names its values DATASET/LABEL. The reference's names win, as
the scores are the reference's structures; a value neither file names is shown as ``label N``.
"""
from __future__ import annotations

import json
from pathlib import Path


def structure_names(reference_dir: Path, prediction_dir: Path | None) -> dict[int, str]:
    """Label value -> name, for every value that ``dataset.json`` or ``labels.json`` names
    (``prediction_dir`` None: the predictions' values are the reference's own)."""
    return {**(_label_map_names(prediction_dir) if prediction_dir is not None else {}), **_dataset_names(reference_dir)}


def structure_title(names: dict[str, str], label: int | str) -> str:
    """The name of ``label`` in ``names`` (a summary's ``label_names``), or ``label N``."""
    return names.get(str(label), f"label {label}")


def _dataset_names(reference_dir: Path) -> dict[int, str]:
    meta = _read(reference_dir.parent / "dataset.json") if reference_dir.name.startswith("labels") else None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, dict):
        return {}
    return {value: name for name, value in labels.items() if type(value) is int and value != 0}


def _label_map_names(prediction_dir: Path) -> dict[int, str]:
    table = _read(prediction_dir / "labels.json")
    entries = table.get("labels") if isinstance(table, dict) else None
    if not isinstance(entries, list):
        return {}
    return {entry["value"]: f"{entry['dataset']}/{entry['label']}" for entry in entries
            if isinstance(entry, dict) and {"value", "dataset", "label"} <= entry.keys()}


def _read(path: Path):
    """The JSON in ``path``; None where there is none (names are a courtesy, never a reason to fail)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
