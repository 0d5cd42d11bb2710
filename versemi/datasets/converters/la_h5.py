"""LA 2018 challenge as distributed with UA-MT: ``<ID>/mri_norm2.h5`` per case.

Each h5 file holds ``image`` (float32, axes x, y, z) and ``label`` (uint8 0/1). Optional
``train.list`` / ``test.list`` files (one ID per line, or a path whose case folder is the ID)
fix the split and the order: train.list cases become imagesTr/labelsTr in list order (written as
``case_order``, so "the first 8/16 labeled cases" matches the literature), test.list cases become
imagesTs/labelsTs. Without a train.list every ID found (not in test.list) is a training case,
sorted; with one, IDs in neither list are left out. The h5 files carry no geometry: spacing is
0.625 mm isotropic unless given, origin 0, identity direction.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import h5py
import numpy as np

from ...errors import input_error
from ..io import Geometry
from ..layout import IMAGES_TR, IMAGES_TS, LABELS_TR, LABELS_TS, write_dataset_json
from ._output import binary_label, building, prepare_output, progress, require_dir, write_channels, write_label

H5_NAME = "mri_norm2.h5"
LA_CHANNELS = ["MRI"]
LA_LABELS = {"background": 0, "left_atrium": 1}
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_FILE_ENDING = re.compile(r"\.(h5|nrrd|nii|nii\.gz|mha)$", re.IGNORECASE)


def read_id_list(path: Path) -> list[str]:
    """The case IDs of a train.list/test.list file, in order (blank and ``#`` lines skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise input_error(path, f"cannot be read as a text list ({exc})", "write one case ID per line") from exc
    ids = []
    for line in lines:
        parts = [p for p in re.split(r"[\\/]", line.strip()) if p]
        if not parts or parts[0].startswith("#"):
            continue
        ids.append(parts[-2] if len(parts) > 1 and _FILE_ENDING.search(parts[-1]) else parts[-1])
    return list(dict.fromkeys(ids))


def split_ids(source: Path, available: Iterable[str], case_file: Callable[[str], Path],
              ids: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(training IDs in order, test IDs) from train.list/test.list, restricted to ``ids`` if given.

    A selected ID without its file on disk is an InputError naming the missing file.
    """
    available = set(available)
    train_list, test_list = source / "train.list", source / "test.list"
    test = read_id_list(test_list) if test_list.is_file() else []
    train = read_id_list(train_list) if train_list.is_file() else sorted(available - set(test))
    test_set = set(test)
    both = [i for i in train if i in test_set]
    if both:
        raise input_error(test_list, f"lists {both[:5]} which train.list lists too",
                          "put each case in only one of train.list and test.list")
    origin = {i: (train_list.name if train_list.is_file() else "the source folder") for i in train}
    origin.update({i: test_list.name for i in test})
    if ids is not None:
        wanted = list(dict.fromkeys(ids))
        extra = [i for i in wanted if i not in origin]
        origin.update({i: "the ids option" for i in extra})
        train = [i for i in train if i in wanted] + extra
        test = [i for i in test if i in wanted]
    for case_id in train + test:
        if case_id not in available:
            raise input_error(case_file(case_id), f"is missing, but case {case_id!r} is listed in {origin[case_id]}",
                              "restore the case's files, or remove the case from the list")
    return train, test


def _read_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with h5py.File(path, "r") as f:
            missing = [key for key in ("image", "label") if key not in f]
            if missing:
                raise input_error(path, f"has no dataset {' or '.join(map(repr, missing))} "
                                        f"(it holds {sorted(f.keys())})",
                                  "use the UA-MT mri_norm2.h5 files, which hold 'image' and 'label'")
            image, label = f["image"][()], f["label"][()]
    except OSError as exc:
        raise input_error(path, f"cannot be read as HDF5 ({exc})", "replace it with an intact copy") from exc
    if image.ndim != 3 or image.shape != label.shape:
        raise input_error(path, f"image {image.shape} and label {label.shape} are not 3D arrays of one shape",
                          "replace it with an intact copy")
    return image.astype(np.float32, copy=False), binary_label(label, path)


def convert_la_h5(source: Path, output: Path, *, overwrite: bool = False, show_progress: bool = True,
                  spacing: Sequence[float] = (0.625, 0.625, 0.625), ids: Sequence[str] | None = None) -> Path:
    """Convert UA-MT's LA h5 folder into a raw dataset at ``output``; returns ``output``.

    ``spacing`` is (x, y, z) in mm; ``ids`` converts only those cases (list order kept).
    """
    source, output = Path(source), Path(output)
    require_dir(source, "point to the folder holding <ID>/mri_norm2.h5 (UA-MT's LA data)")
    prepare_output(source, output, overwrite)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise input_error("spacing", f"{spacing} is not three positive numbers", "give x, y, z spacing in mm")
    available = sorted(p.parent.name for p in source.glob(f"*/{H5_NAME}"))
    if not available and ids is None and not (source / "train.list").is_file():
        raise input_error(source, f"holds no <ID>/{H5_NAME} files", "point to UA-MT's LA data folder")
    train, test = split_ids(source, available, lambda i: source / i / H5_NAME, ids)
    geometry = Geometry(spacing, (0.0, 0.0, 0.0), IDENTITY)
    jobs = [(IMAGES_TR, LABELS_TR, i) for i in train] + [(IMAGES_TS, LABELS_TS, i) for i in test]
    with building(output) as tmp:
        for images, labels, case_id in progress(jobs, show_progress, "la-h5"):
            image, label = _read_h5(source / case_id / H5_NAME)
            # h5 axes are (x, y, z); SimpleITK arrays are (z, y, x).
            write_channels(tmp / images, case_id, [image.transpose(2, 1, 0)], geometry)
            write_label(tmp / labels, case_id, label.transpose(2, 1, 0), geometry)
        write_dataset_json(tmp, LA_CHANNELS, LA_LABELS, len(train), case_order=train)
    return output
