"""Shared by the converters: build the dataset in a temporary sibling folder, then rename it.

``prepare_output`` refuses, before anything is read or written, an existing non-empty output
(unless ``overwrite``) and any output that overlaps the source. ``building`` yields the
temporary folder and renames it onto the output only when the block succeeds, so a failed or
interrupted conversion leaves the output as it was.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np

from ...console import progress_bar
from ...errors import input_error
from ..io import Geometry, write_image

ENDING = ".nii.gz"
T = TypeVar("T")


def prepare_output(source: Path, output: Path, overwrite: bool) -> None:
    """Refuse an output that exists (unless ``overwrite``) or overlaps ``source``."""
    src, out = source.resolve(), output.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise input_error(output, f"overlaps the source folder {source}",
                          "write the converted dataset to a folder outside the source")
    if output.is_file() or output.is_symlink() or (output.is_dir() and any(output.iterdir())):
        if not overwrite:
            raise input_error(output, "already exists and is not empty",
                              "choose another output folder, or pass overwrite=True (--overwrite) to replace it")


def require_dir(folder: Path, fix: str) -> None:
    if not folder.is_dir():
        raise input_error(folder, "folder does not exist", fix)


@contextmanager
def building(output: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``output``; on success it replaces ``output``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    partial.chmod(0o777 & ~umask)  # mkdtemp makes it private; the dataset gets ordinary permissions
    try:
        yield partial
        _replace(partial, output)
    finally:
        if partial.exists():
            shutil.rmtree(partial)


def _replace(partial: Path, output: Path) -> None:
    if not (output.exists() or output.is_symlink()):
        os.replace(partial, output)
        return
    # Move the old output aside first: it is deleted only once the new one is in place.
    trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    os.replace(output, trash / "old")
    try:
        os.replace(partial, output)
    except BaseException:
        os.replace(trash / "old", output)
        trash.rmdir()
        raise
    shutil.rmtree(trash)


def progress(items: Iterable[T], show: bool, desc: str) -> Iterable[T]:
    return progress_bar(items, desc=desc, unit="case", show=show)


def write_channels(folder: Path, case_id: str, channels: Sequence[np.ndarray], geometry: Geometry) -> None:
    """Write ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ... from ``(z, y, x)`` arrays."""
    for c, array in enumerate(channels):
        write_image(np.ascontiguousarray(array), geometry, folder / f"{case_id}_{c:04d}{ENDING}")


def write_label(folder: Path, case_id: str, array: np.ndarray, geometry: Geometry) -> None:
    """Write ``CASE.nii.gz`` as uint8."""
    write_image(np.ascontiguousarray(array, dtype=np.uint8), geometry, folder / f"{case_id}{ENDING}")


def binary_label(array: np.ndarray, file: Path) -> np.ndarray:
    """A 0/1 uint8 mask from a label stored as 0/1 or 0/255; other values are an InputError."""
    unexpected = (array != 0) & (array != 1) & (array != 255)
    if unexpected.any():
        values = np.unique(array[unexpected])[:5].tolist()
        raise input_error(file, f"holds label values {values} (expected only 0 and 1, or 0 and 255)",
                          "use a binary mask of the structure")
    return (array != 0).astype(np.uint8)


def integer_label(array: np.ndarray, file: Path) -> np.ndarray:
    """A uint8 label array from the integer one ``read_label`` gives; values outside 0..255 are an InputError."""
    outside = (array < 0) | (array > 255)
    if outside.any():
        raise input_error(file, f"holds label values {np.unique(array[outside])[:5].tolist()} outside 0..255",
                          "store the segmentation as label values 0, 1, 2, ... as declared in dataset.json")
    return array.astype(np.uint8)
