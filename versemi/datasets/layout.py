"""The raw dataset layout: nnU-Net v2's, plus a folder of unlabeled training images.

```
RAW/<Dataset>/
  dataset.json           channel_names, labels, numTraining, file_ending (nnU-Net v2 keys)
  imagesTr/CASE_0000.nii.gz, CASE_0001.nii.gz, ...   one file per channel
  labelsTr/CASE.nii.gz
  imagesUnlabeled/CASE_0000.nii.gz ...               optional: training images without labels
  imagesTs/CASE_0000.nii.gz ...                      optional: test images
  labelsTs/CASE.nii.gz                               optional: test labels (for evaluation only)
```
A folder nnU-Net v2 accepts is accepted unchanged. An optional ``case_order`` list in
dataset.json fixes the order of the labeled cases (converters write the literature's order);
without it the order is the sorted case ids. ``labeled_limit=N`` keeps the labels of the first N
cases in that order and uses the remaining labeled cases as unlabeled images (LA-8, LA-16, ...).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..atomic import read_json, write_json
from ..errors import input_error
from .io import SUPPORTED_ENDINGS

DATASET_JSON = "dataset.json"
IMAGES_TR, LABELS_TR = "imagesTr", "labelsTr"
IMAGES_UNLABELED = "imagesUnlabeled"
IMAGES_TS, LABELS_TS = "imagesTs", "labelsTs"
REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


@dataclass
class RawCase:
    """One case of a raw dataset: its channel files and (if labeled) its segmentation."""

    case_id: str
    images: list[Path]
    label: Path | None = None

    @property
    def labeled(self) -> bool:
        return self.label is not None


@dataclass
class RawDataset:
    """A raw dataset folder, read from its dataset.json."""

    folder: Path
    meta: dict = field(repr=False)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def file_ending(self) -> str:
        return self.meta["file_ending"]

    @property
    def channel_names(self) -> list[str]:
        channels = self.meta["channel_names"]
        return [channels[k] for k in sorted(channels, key=int)]

    @property
    def num_channels(self) -> int:
        return len(self.meta["channel_names"])

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> integer value, background included."""
        return {name: int(value) for name, value in self.meta["labels"].items()}

    @property
    def foreground_labels(self) -> dict[str, int]:
        return {n: v for n, v in sorted(self.labels.items(), key=lambda kv: kv[1]) if v != 0}

    @property
    def is_ct(self) -> bool:
        return any(name.strip().lower() == "ct" for name in self.channel_names)

    def case_files(self, images_folder: str) -> dict[str, list[Path]]:
        """Case id -> channel files in ``images_folder`` (files of other endings are ignored)."""
        return group_channel_files(self.folder / images_folder, self.file_ending)

    def labeled_cases(self) -> list[RawCase]:
        """The labeled training cases, in the dataset's case order."""
        files = self.case_files(IMAGES_TR)
        labels_dir = self.folder / LABELS_TR
        ordered = self._ordered_ids(files)
        return [RawCase(cid, files[cid], labels_dir / f"{cid}{self.file_ending}") for cid in ordered]

    def unlabeled_cases(self) -> list[RawCase]:
        files = self.case_files(IMAGES_UNLABELED)
        return [RawCase(cid, files[cid]) for cid in sorted(files)]

    def test_cases(self) -> list[RawCase]:
        files = self.case_files(IMAGES_TS)
        labels_dir = self.folder / LABELS_TS
        cases = []
        for cid in sorted(files):
            label = labels_dir / f"{cid}{self.file_ending}"
            cases.append(RawCase(cid, files[cid], label if label.is_file() else None))
        return cases

    def training_cases(self, labeled_limit: int | None = None) -> list[RawCase]:
        """Labeled then unlabeled training cases; beyond ``labeled_limit`` labels are dropped."""
        labeled = self.labeled_cases()
        if labeled_limit is not None:
            if labeled_limit < 1:
                raise input_error(self.folder / DATASET_JSON, f"labeled limit {labeled_limit} is below 1",
                                  "give a positive number of labeled cases, e.g. LA=8")
            demoted = [RawCase(c.case_id, c.images) for c in labeled[labeled_limit:]]
            labeled = labeled[:labeled_limit]
        else:
            demoted = []
        return labeled + demoted + self.unlabeled_cases()

    def _ordered_ids(self, files: dict[str, list[Path]]) -> list[str]:
        order = self.meta.get("case_order")
        if not order:
            return sorted(files)
        known = [cid for cid in order if cid in files]
        rest = sorted(set(files) - set(known))
        return known + rest


def group_channel_files(folder: Path, ending: str) -> dict[str, list[Path]]:
    """Group ``CASE_XXXX<ending>`` files of a folder by case id, channels in order."""
    if not folder.is_dir():
        return {}
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(ending)}$")
    grouped: dict[str, dict[int, Path]] = {}
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match:
            grouped.setdefault(match["case"], {})[int(match["channel"])] = path
    return {case: [channels[c] for c in sorted(channels)] for case, channels in grouped.items()}


def load_dataset(folder: str | Path) -> RawDataset:
    """Read ``folder/dataset.json``; a missing file or key is an InputError naming the fix."""
    folder = Path(folder)
    meta_path = folder / DATASET_JSON
    if not meta_path.is_file():
        raise input_error(meta_path, "missing", "create dataset.json with channel_names, labels, numTraining "
                                                "and file_ending (nnU-Net v2 format)")
    try:
        meta = read_json(meta_path)
    except ValueError as exc:
        raise input_error(meta_path, f"is not valid JSON ({exc})", "fix the JSON syntax") from exc
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise input_error(meta_path, f"lacks the key(s) {', '.join(missing)}",
                          "add them as in nnU-Net v2's dataset.json")
    if meta["file_ending"] not in SUPPORTED_ENDINGS:
        raise input_error(meta_path, f"file_ending {meta['file_ending']!r} is not supported",
                          f"use one of {', '.join(SUPPORTED_ENDINGS)}")
    bad_labels = {k: v for k, v in meta["labels"].items() if not isinstance(v, int) or isinstance(v, bool)}
    if bad_labels:
        raise input_error(meta_path, f"labels {sorted(bad_labels)} are not single integers "
                                     "(region-based labels are not supported)",
                          "map each label name to one integer value")
    if 0 not in meta["labels"].values():
        raise input_error(meta_path, "labels has no background entry with value 0",
                          'add "background": 0 to labels')
    return RawDataset(folder, meta)


def available_datasets(raw_root: Path) -> list[str]:
    if not raw_root.is_dir():
        return []
    return sorted(p.name for p in raw_root.iterdir() if (p / DATASET_JSON).is_file())


def find_dataset(raw_root: str | Path, name: str) -> Path:
    """Resolve a dataset name (``LA``, ``Dataset001_LA``, or its number ``1``) to its folder."""
    raw_root = Path(raw_root)
    names = available_datasets(raw_root)
    for candidate in names:
        if candidate == name:
            return raw_root / candidate
    match = re.compile(r"^Dataset(\d{3})_(.+)$")
    for candidate in names:
        m = match.match(candidate)
        if m and (m.group(2) == name or (name.isdigit() and int(name) == int(m.group(1)))):
            return raw_root / candidate
    listing = ", ".join(names) if names else "none"
    raise input_error(raw_root / name, f"unknown dataset {name!r} (datasets in {raw_root}: {listing})",
                      "create it with versemi_make_synthetic or versemi_convert, or point --raw / "
                      "$VERSEMI_RAW at the folder that holds it")


def write_dataset_json(folder: str | Path, channel_names: Iterable[str], labels: dict[str, int],
                       num_training: int, file_ending: str = ".nii.gz",
                       case_order: list[str] | None = None, **extra) -> Path:
    """Write an nnU-Net v2 dataset.json (plus ``case_order`` and any extra keys) atomically."""
    meta = {
        "channel_names": {str(i): name for i, name in enumerate(channel_names)},
        "labels": dict(labels),
        "numTraining": int(num_training),
        "file_ending": file_ending,
    }
    if case_order is not None:
        meta["case_order"] = list(case_order)
    meta.update(extra)
    path = Path(folder) / DATASET_JSON
    write_json(meta, path)
    return path
