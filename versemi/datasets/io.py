"""Reading and writing images with their geometry (spacing, origin, direction).

Arrays are in SimpleITK's numpy order: ``(z, y, x)`` for one channel, ``(c, z, y, x)`` for an
image made of several channel files. ``Geometry`` keeps SimpleITK's own ``(x, y, z)`` order so it
can be written back unchanged; ``Geometry.spacing_zyx`` gives the spacing in array order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_path
from ..errors import input_error

SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a 3D image, in SimpleITK's (x, y, z) order."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return tuple(reversed(self.spacing))  # type: ignore[return-value]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def matches(self, other: "Geometry", tolerance: float = 1e-4) -> bool:
        """True when both describe the same voxel grid placement (relative tolerance on spacing)."""
        spacing_ok = np.allclose(self.spacing, other.spacing, rtol=tolerance, atol=1e-6)
        origin_ok = np.allclose(self.origin, other.origin, rtol=0, atol=max(tolerance * max(self.spacing), 1e-3))
        direction_ok = np.allclose(self.direction, other.direction, atol=1e-3)
        return bool(spacing_ok and origin_ok and direction_ok)

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))


def file_ending(path: str | Path) -> str:
    """The supported ending of ``path`` (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``) or ''."""
    name = Path(path).name.lower()
    for ending in SUPPORTED_ENDINGS:
        if name.endswith(ending):
            return ending
    return ""


def read_sitk(path: str | Path) -> sitk.Image:
    """Read one file with SimpleITK; an unreadable file becomes an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "file does not exist", "check the path, or re-create the dataset folder")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reader error"
        raise input_error(path, f"cannot be read as an image ({first_line[:200]})",
                          "replace it with an intact copy in a format SimpleITK reads "
                          f"({', '.join(SUPPORTED_ENDINGS)})") from exc


def read_image(paths: Sequence[str | Path]) -> tuple[np.ndarray, Geometry]:
    """Read the channel files of one case into a float32 ``(c, z, y, x)`` array and its geometry.

    All channels must share shape and geometry; the geometry of the first channel is returned.
    """
    arrays, geometry = [], None
    for path in paths:
        image = read_sitk(path)
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise input_error(path, f"is not a single-channel 3D image (dimension {image.GetDimension()}, "
                                    f"{image.GetNumberOfComponentsPerPixel()} components per voxel)",
                              "store each channel as its own 3D file CASE_0000, CASE_0001, ... "
                              "(versemi_convert msd splits 4D files)")
        g = Geometry.of(image)
        array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
        if geometry is None:
            geometry = g
        elif array.shape != arrays[0].shape or not g.matches(geometry):
            raise input_error(path, "channel differs in shape or geometry from the case's first channel",
                              "resample all channels of a case onto the same voxel grid")
        arrays.append(array)
    if geometry is None:
        raise ValueError("read_image needs at least one path")
    return np.stack(arrays), geometry


def read_label(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a segmentation as an integer ``(z, y, x)`` array and its geometry."""
    image = read_sitk(path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise input_error(path, "a segmentation must be a single-channel 3D image",
                          "store labels as one 3D integer image per case")
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise input_error(path, "segmentation holds non-integer values",
                              "store labels as integers 0, 1, 2, ... as declared in dataset.json")
        array = rounded
    return array.astype(np.int16, copy=False), Geometry.of(image)


def write_image(array: np.ndarray, geometry: Geometry, path: str | Path) -> None:
    """Write a ``(z, y, x)`` array with ``geometry`` to ``path`` atomically (format from the ending)."""
    path = Path(path)
    ending = file_ending(path)
    if not ending:
        raise input_error(path, "unsupported file ending", f"use one of {', '.join(SUPPORTED_ENDINGS)}")
    image = geometry.apply_to(sitk.GetImageFromArray(array))
    with atomic_path(path, suffix=ending) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
