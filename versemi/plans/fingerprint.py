"""Dataset fingerprint: per-case spacing and shapes, foreground intensity and label statistics.

Written to ``<plans root>/<Dataset>/fingerprint.json`` (plus ``fingerprint_samples.npz``, a small
per-case sample of foreground intensities so that an experiment using only some labels computes
its normalization from those cases alone). Reused as long as the raw files are unchanged
(``raw_digest``: names, sizes and modification times of every raw training file).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, read_json, write_json
from ..datasets.integrity import check_case, constant_image_warnings
from ..datasets.layout import IMAGES_TR, IMAGES_UNLABELED, LABELS_TR, RawCase, RawDataset
from ..errors import InputError, Problem, warn
from ..parallel import map_with_progress
from ..preprocessing.cropping import nonzero_bbox

FINGERPRINT_VERSION = 1
FINGERPRINT_FILE, SAMPLES_FILE = "fingerprint.json", "fingerprint_samples.npz"
# nnU-Net samples 1e8 foreground voxels over a dataset; 1e7 keeps percentiles stable to ~0.1 %
# (on the 80 LA cases both percentiles equal nnU-Net's, benchmarks/RESULTS.md) at a tenth of the memory.
TOTAL_INTENSITY_SAMPLES = 10_000_000
STORED_SAMPLES_PER_CASE = 2_000
SEED = 1234


@dataclass
class CaseResult:
    """What one worker returns for one case."""

    problems: list[Problem]
    record: dict | None = None
    samples: np.ndarray | None = None  # (channels, n) for the full-data statistics
    stored_samples: np.ndarray | None = None  # (channels, <= STORED_SAMPLES_PER_CASE)
    warnings: list[Problem] = field(default_factory=list)


def raw_digest(dataset: RawDataset) -> str:
    """Digest of dataset.json and the name, size and mtime of every training file."""
    h = hashlib.sha256((dataset.folder / "dataset.json").read_bytes())
    for sub in (IMAGES_TR, LABELS_TR, IMAGES_UNLABELED):
        folder = dataset.folder / sub
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                stat = path.stat()
                h.update(f"{sub}/{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def fingerprint_case(case: RawCase, dataset: RawDataset, case_index: int, samples_per_case: int) -> CaseResult:
    """Check one case and measure it (runs in a worker process)."""
    problems, image, label, geometry = check_case(case, dataset)
    if problems or image is None:
        return CaseResult(problems)
    warnings = constant_image_warnings(case, image)
    bbox = nonzero_bbox(image)
    cropped_shape = [hi - lo for lo, hi in bbox]
    record = {
        "case_id": case.case_id,
        "labeled": label is not None,
        "spacing": list(geometry.spacing_zyx),
        "shape": list(image.shape[1:]),
        "shape_after_crop": cropped_shape,
        "crop_fraction": float(np.prod(cropped_shape) / np.prod(image.shape[1:])),
    }
    if label is None:
        return CaseResult([], record, warnings=warnings)
    rng = np.random.default_rng(SEED + case_index)
    foreground = image[:, label > 0]  # (channels, n)
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    values, counts = np.unique(label, return_counts=True)
    record["label_voxels"] = {str(int(v)): int(c) for v, c in zip(values, counts) if v != 0}
    record["label_volume_ml"] = {k: c * voxel_ml for k, c in record["label_voxels"].items()}
    record["foreground_voxels"] = int(foreground.shape[1])
    if foreground.shape[1] == 0:
        return CaseResult([], record, np.zeros((image.shape[0], 0), np.float32), np.zeros((image.shape[0], 0), np.float32),
                          warnings)
    # voxels (z, y, x) of the box around every labeled structure: the planner compares it with the patch
    record["foreground_extent"] = [hi - lo for lo, hi in nonzero_bbox((label > 0)[None])]
    sample = foreground[:, rng.integers(0, foreground.shape[1], samples_per_case)]
    stored = sample[:, :STORED_SAMPLES_PER_CASE]
    return CaseResult([], record, sample, stored, warnings)


def intensity_statistics(samples: np.ndarray) -> dict:
    """nnU-Net's foreground intensity properties of a 1D sample."""
    if samples.size == 0:
        return {k: float("nan") for k in ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")}
    p005, median, p995 = np.percentile(samples, [0.5, 50.0, 99.5])
    return {"mean": float(samples.mean()), "median": float(median), "std": float(samples.std()),
            "min": float(samples.min()), "max": float(samples.max()),
            "percentile_99_5": float(p995), "percentile_00_5": float(p005)}


def compute_fingerprint(dataset: RawDataset, num_processes: int = 2, show_progress: bool = True) -> tuple[dict, dict]:
    """Check and measure every training case; raise InputError listing all problems found.

    Returns (fingerprint dict, stored per-case samples {case_id: (channels, n) array}).
    """
    labeled = dataset.labeled_cases()
    cases = labeled + dataset.unlabeled_cases()
    samples_per_case = max(1, TOTAL_INTENSITY_SAMPLES // max(1, len(labeled)))
    work = partial(_fingerprint_indexed, dataset=dataset, samples_per_case=samples_per_case)
    results = map_with_progress(work, list(enumerate(cases)), num_processes, f"fingerprint {dataset.name}",
                                show_progress)
    for warning in (w for r in results for w in r.warnings):
        warn(warning)
    problems = [p for r in results for p in r.problems]
    if problems:
        raise InputError(problems)
    records = [r.record for r in results if r.record is not None]
    with_samples = [r for r in results if r.samples is not None]
    pooled = np.concatenate([r.samples for r in with_samples], axis=1) if with_samples else np.zeros((1, 0))
    fingerprint = {
        "fingerprint_version": FINGERPRINT_VERSION,
        "dataset": dataset.name,
        "raw_digest": raw_digest(dataset),
        "channel_names": dataset.channel_names,
        "labels": dataset.labels,
        "num_labeled": len(labeled),
        "num_unlabeled": len(cases) - len(labeled),
        "spacings": [r["spacing"] for r in records],
        "shapes_after_crop": [r["shape_after_crop"] for r in records],
        "median_relative_size_after_cropping": float(np.median([r["crop_fraction"] for r in records])),
        "foreground_intensity_properties_per_channel": {
            str(c): intensity_statistics(pooled[c]) for c in range(dataset.num_channels)},
        "cases": records,
    }
    stored = {r.record["case_id"]: r.stored_samples for r in with_samples}
    return fingerprint, stored


def _fingerprint_indexed(indexed_case: tuple[int, RawCase], dataset: RawDataset, samples_per_case: int) -> CaseResult:
    index, case = indexed_case
    return fingerprint_case(case, dataset, index, samples_per_case)


def fingerprint_folder(plans_root: Path, dataset_name: str) -> Path:
    return plans_root / dataset_name


def load_or_compute_fingerprint(dataset: RawDataset, plans_root: Path, num_processes: int = 2,
                                show_progress: bool = True, write: bool = True) -> tuple[dict, dict]:
    """The dataset's fingerprint, recomputed only when the raw files changed since it was written."""
    folder = fingerprint_folder(plans_root, dataset.name)
    existing = load_fingerprint(folder)
    if existing is not None and existing[0].get("raw_digest") == raw_digest(dataset):
        return existing
    fingerprint, stored = compute_fingerprint(dataset, num_processes, show_progress)
    if write:
        save_fingerprint(folder, fingerprint, stored)
    return fingerprint, stored


def save_fingerprint(folder: Path, fingerprint: dict, stored: dict) -> None:
    """Write the samples, then the JSON (the JSON's presence marks a complete fingerprint)."""
    existing = load_fingerprint(folder)
    if existing is not None and existing[0] == json.loads(json.dumps(fingerprint)):
        return
    with atomic_path(folder / SAMPLES_FILE, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **stored)
    write_json(fingerprint, folder / FINGERPRINT_FILE)


def load_fingerprint(folder: Path) -> tuple[dict, dict] | None:
    """A previously written fingerprint and its samples, or None if absent, damaged or outdated."""
    try:
        fingerprint = read_json(folder / FINGERPRINT_FILE)
        with np.load(folder / SAMPLES_FILE) as npz:
            stored = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError):
        return None
    if fingerprint.get("fingerprint_version") != FINGERPRINT_VERSION:
        return None
    return fingerprint, stored
