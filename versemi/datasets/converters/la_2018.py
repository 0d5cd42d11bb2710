"""LA 2018 challenge, original layout: ``<ID>/lgemri.nrrd`` and ``<ID>/laendo.nrrd`` per case.

The geometry (spacing, origin, direction) comes from ``lgemri.nrrd``; the label (stored 0/255) is
written as 0/1 on the image's voxel grid (its shape must equal the image's). Case folders are the
sub-folders holding ``lgemri.nrrd``; the split and order follow ``train.list`` / ``test.list`` as
for la-h5 (without a train.list: sorted folder names). Test cases without ``laendo.nrrd`` get no
labelsTs file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ...errors import input_error
from ..io import Geometry, read_sitk
from ..layout import IMAGES_TR, IMAGES_TS, LABELS_TR, LABELS_TS, write_dataset_json
from ._output import binary_label, building, prepare_output, progress, require_dir, write_channels, write_label
from .la_h5 import LA_CHANNELS, LA_LABELS, split_ids

IMAGE_NAME, LABEL_NAME = "lgemri.nrrd", "laendo.nrrd"


def _read_3d(path: Path) -> tuple[np.ndarray, Geometry]:
    image = read_sitk(path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise input_error(path, "is not a single-channel 3D image", "replace it with an intact copy")
    return sitk.GetArrayFromImage(image), Geometry.of(image)


def convert_la_2018(source: Path, output: Path, *, overwrite: bool = False, show_progress: bool = True,
                    ids: Sequence[str] | None = None) -> Path:
    """Convert the LA 2018 challenge's nrrd folders into a raw dataset at ``output``; returns it."""
    source, output = Path(source), Path(output)
    require_dir(source, "point to the folder holding <ID>/lgemri.nrrd and <ID>/laendo.nrrd")
    prepare_output(source, output, overwrite)
    available = sorted(p.parent.name for p in source.glob(f"*/{IMAGE_NAME}"))
    if not available and ids is None and not (source / "train.list").is_file():
        raise input_error(source, f"holds no <ID>/{IMAGE_NAME} files", "point to the LA 2018 training set folder")
    train, test = split_ids(source, available, lambda i: source / i / IMAGE_NAME, ids)
    for case_id in train:
        if not (source / case_id / LABEL_NAME).is_file():
            raise input_error(source / case_id / LABEL_NAME, "is missing (training cases need a label)",
                              "restore the label, or move the case to test.list")
    jobs = [(IMAGES_TR, LABELS_TR, i) for i in train] + [(IMAGES_TS, LABELS_TS, i) for i in test]
    with building(output) as tmp:
        for images, labels, case_id in progress(jobs, show_progress, "la-2018"):
            image, geometry = _read_3d(source / case_id / IMAGE_NAME)
            write_channels(tmp / images, case_id, [image], geometry)
            label_path = source / case_id / LABEL_NAME
            if label_path.is_file():
                label, _ = _read_3d(label_path)
                if label.shape != image.shape:
                    raise input_error(label_path, f"has shape {label.shape[::-1]}, the image {image.shape[::-1]}",
                                      f"use the label that belongs to {IMAGE_NAME}")
                write_label(tmp / labels, case_id, binary_label(label, label_path), geometry)
        write_dataset_json(tmp, LA_CHANNELS, LA_LABELS, len(train), case_order=train)
    return output
