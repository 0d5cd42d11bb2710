"""Integrity checks of raw datasets: find every problem in one pass, before anything is written.

Dataset-level checks (this module) look at dataset.json and the file listing; case-level checks
(``check_case``) look inside the files and run in the fingerprint's worker processes, so each
file is read once for both jobs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError, Problem
from .io import Geometry, read_image, read_label
from .layout import IMAGES_TR, IMAGES_UNLABELED, LABELS_TR, RawCase, RawDataset, find_dataset, load_dataset


def check_dataset_listing(dataset: RawDataset) -> list[Problem]:
    """Problems visible without reading images: missing/duplicate cases, channel files, numTraining."""
    problems: list[Problem] = []
    ending = dataset.file_ending
    meta_path = str(dataset.folder / "dataset.json")
    training = dataset.case_files(IMAGES_TR)
    unlabeled = dataset.case_files(IMAGES_UNLABELED)
    labels_dir = dataset.folder / LABELS_TR
    if not training:
        problems.append(Problem(str(dataset.folder / IMAGES_TR), f"no training images named CASE_0000{ending}",
                                "put the labeled images there as CASE_0000" + ending))
    for folder_name, cases in ((IMAGES_TR, training), (IMAGES_UNLABELED, unlabeled)):
        for case_id, files in sorted(cases.items()):
            channels = [int(p.name[len(case_id) + 1:len(case_id) + 5]) for p in files]
            expected = list(range(dataset.num_channels))
            if channels != expected:
                problems.append(Problem(str(dataset.folder / folder_name / f"{case_id}_XXXX{ending}"),
                                        f"case has channel files {channels}, dataset.json declares "
                                        f"{dataset.num_channels} channel(s) {expected}",
                                        "provide exactly one file per channel declared in channel_names"))
    for case_id in sorted(training):
        if not (labels_dir / f"{case_id}{ending}").is_file():
            problems.append(Problem(str(labels_dir / f"{case_id}{ending}"), "label missing for a training image",
                                    f"add the label, or move the image to {IMAGES_UNLABELED}/ to use it unlabeled"))
    if labels_dir.is_dir():
        for label in sorted(labels_dir.iterdir()):
            if label.name.endswith(ending) and label.name[:-len(ending)] not in training:
                problems.append(Problem(str(label), "label has no image in imagesTr",
                                        f"add {label.name[:-len(ending)]}_0000{ending} to imagesTr or remove the label"))
    for case_id in sorted(set(training) & set(unlabeled)):
        problems.append(Problem(str(dataset.folder / IMAGES_UNLABELED / f"{case_id}_0000{ending}"),
                                f"case id {case_id!r} is used in both imagesTr and imagesUnlabeled",
                                "give every case a unique id"))
    if dataset.meta["numTraining"] != len(training):
        problems.append(Problem(meta_path, f"numTraining is {dataset.meta['numTraining']} but imagesTr holds "
                                           f"{len(training)} case(s)",
                                f"set numTraining to {len(training)} or add the missing cases"))
    order = dataset.meta.get("case_order") or []
    duplicates = sorted({c for c in order if order.count(c) > 1})
    if duplicates:
        problems.append(Problem(meta_path, f"case_order lists {duplicates} more than once", "list each case once"))
    unknown = [c for c in order if c not in training]
    if unknown:
        problems.append(Problem(meta_path, f"case_order names cases without images: {unknown[:5]}",
                                "remove them from case_order or add their images"))
    problems.extend(_case_group_problems(dataset.meta.get("case_groups"), set(training) | set(unlabeled), meta_path))
    return problems


def _case_group_problems(groups, cases: set[str], meta_path: str) -> list[Problem]:
    """``case_groups`` (optional) must map case ids of the dataset to group names."""
    if groups is None:
        return []
    if not isinstance(groups, dict) or not all(isinstance(g, str) for g in groups.values()):
        return [Problem(meta_path, "case_groups is not an object mapping case ids to group names (strings)",
                        'write it as {"case_id": "subject", ...}, e.g. {"hc18_001": "001", "hc18_001_2": "001"}')]
    unknown = sorted(set(groups) - cases)
    if unknown:
        # a misspelt id would silently leave that case out of its group, and its subject split across folds
        return [Problem(meta_path, f"case_groups names cases without images: {unknown[:5]}",
                        "remove them from case_groups or correct the case ids")]
    return []


def check_case(case: RawCase, dataset: RawDataset) -> tuple[list[Problem], np.ndarray | None,
                                                             np.ndarray | None, Geometry | None]:
    """Read one case and return (problems, image, label, geometry); arrays are None when unreadable."""
    problems: list[Problem] = []
    if len(case.images) != dataset.num_channels:
        return [], None, None, None  # reported by check_dataset_listing
    try:
        image, geometry = read_image(case.images)
    except InputError as exc:
        return exc.problems, None, None, None
    if not np.isfinite(image).all():
        count = int(image.size - np.isfinite(image).sum())
        problems.append(Problem(str(case.images[0]), f"{count} voxel(s) are NaN or infinite",
                                "repair or replace the image (e.g. set those voxels to the background value)"))
    label = None
    if case.label is not None and case.label.is_file():  # a missing label is a listing problem
        try:
            label, label_geometry = read_label(case.label)
        except InputError as exc:
            return problems + exc.problems, image, None, geometry
        if label.shape != image.shape[1:]:
            problems.append(Problem(str(case.label), f"shape {label.shape} (z,y,x) differs from the image's "
                                                     f"{image.shape[1:]}",
                                    "resample the label onto the image's voxel grid"))
        elif not label_geometry.matches(geometry):
            problems.append(Problem(str(case.label), f"geometry differs from the image's (label spacing "
                                                     f"{_fmt(label_geometry.spacing)}, origin {_fmt(label_geometry.origin)}; "
                                                     f"image spacing {_fmt(geometry.spacing)}, origin {_fmt(geometry.origin)})",
                                    "copy the image's spacing, origin and direction into the label header "
                                    "if the voxels already correspond, else resample the label"))
        declared = set(dataset.labels.values())
        undeclared = sorted(set(np.unique(label).tolist()) - declared)
        if undeclared:
            problems.append(Problem(str(case.label), f"label values {undeclared} are not declared in dataset.json "
                                                     f"(declared: {sorted(declared)})",
                                    "declare them under labels in dataset.json, or fix the label file"))
        foreground = int(np.count_nonzero(label))
        if foreground and len(constant_channels(image)) == len(image):
            problems.append(Problem(str(case.images[0]), f"image is constant (every voxel {image.flat[0]:g}) but its "
                                                         f"label marks {foreground} voxel(s) as foreground: there is "
                                                         "nothing to learn the label from",
                                    "replace the image with the real scan (was it exported empty?), or remove the "
                                    "case and its label"))
    return problems, image, label, geometry


def constant_channels(image: np.ndarray) -> list[int]:
    """Channels of a ``(c, z, y, x)`` image whose voxels all have one value."""
    flat = image.reshape(len(image), -1)
    return [c for c in range(len(flat)) if flat[c].min() == flat[c].max()]


def constant_image_warnings(case: RawCase, image: np.ndarray) -> list[Problem]:
    """A constant channel file is legal (nothing to learn from it) but usually an empty or failed export."""
    return [Problem(str(case.images[c]), f"image is constant (every voxel {image[c].flat[0]:g})",
                    "check the file: replace it with the real scan, or remove the case if it is a mistake")
            for c in constant_channels(image)]


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def resolve_datasets(raw_root: Path, names: list[str]) -> tuple[list[RawDataset], list[Problem]]:
    """Load each named dataset; unknown names and broken dataset.json files become problems."""
    datasets, problems = [], []
    if len(set(names)) != len(names):
        problems.append(Problem(str(raw_root), f"dataset names repeated in {names}", "name each dataset once"))
    for name in names:
        try:
            dataset = load_dataset(find_dataset(raw_root, name))
        except InputError as exc:
            problems.extend(exc.problems)
            continue
        problems.extend(check_dataset_listing(dataset))
        datasets.append(dataset)
    channel_counts = {d.name: d.num_channels for d in datasets}
    if len(set(channel_counts.values())) > 1:
        problems.append(Problem(str(raw_root), f"datasets planned together need the same number of input "
                                               f"channels, got {channel_counts}",
                                "plan datasets with different channel counts in separate experiments"))
    return datasets, problems

