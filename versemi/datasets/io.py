"""Reading and writing images with their geometry (spacing, origin, direction).

Arrays are in SimpleITK's numpy order: ``(z, y, x)`` for one channel, ``(c, z, y, x)`` for an
image made of several channel files. ``Geometry`` keeps SimpleITK's own ``(x, y, z)`` order so it
can be written back unchanged; ``Geometry.spacing_zyx`` gives the spacing in array order.

A PNG (native 2D data, as nnU-Net's NaturalImage2DIO) is read as a one-slice volume ``(1, y, x)``
so that it flows through the same 3D pipeline as a one-slice NIfTI.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_path
from ..errors import input_error

SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".png")
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


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
    """The supported ending of ``path`` (one of ``SUPPORTED_ENDINGS``) or ''."""
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
        raise _unreadable(path, exc) from exc


def _read_voxels(path: Path) -> tuple[np.ndarray, Geometry, int, int]:
    """Voxels in (z, y, x) order, geometry, dimension and components per voxel of one file.

    NIfTI voxels are read with nibabel: SimpleITK's NIfTI reader silently turns NaN and infinite
    voxels into 0, which would hide exactly the damage the integrity check looks for. The
    geometry still comes from SimpleITK's reading of the header, so it is identical either way.
    """
    if file_ending(path) in (".nii", ".nii.gz"):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
            voxels = np.asanyarray(nib.load(str(path)).dataobj)
        except (RuntimeError, OSError, ValueError, EOFError, nib.filebasedimages.ImageFileError) as exc:
            raise _unreadable(path, exc) from exc
        geometry = Geometry(tuple(reader.GetSpacing())[:3], tuple(reader.GetOrigin())[:3],
                            tuple(reader.GetDirection()) if reader.GetDimension() == 3 else ())
        components = reader.GetNumberOfComponents()
        if voxels.ndim == 3:
            voxels = voxels.transpose(2, 1, 0)
        return voxels, geometry, reader.GetDimension(), components
    if file_ending(path) == ".png":
        return _read_png(path)
    image = read_sitk(path)
    return sitk.GetArrayFromImage(image), Geometry.of(image) if image.GetDimension() == 3 else None, \
        image.GetDimension(), image.GetNumberOfComponentsPerPixel()


# PNG colour type (byte 25 of the file) -> components per pixel once decoded (a palette decodes to RGB)
_PNG_COMPONENTS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def _png_header_components(path: Path) -> int:
    """Components per pixel from the PNG header (1 when it is not a PNG header)."""
    with open(path, "rb") as f:
        header = f.read(26)
    if len(header) < 26 or header[:8] != b"\x89PNG\r\n\x1a\n":
        return 1
    return _PNG_COMPONENTS.get(header[25], 1)


def _read_png(path: Path) -> tuple[np.ndarray, Geometry, int, int]:
    """A grayscale PNG as a one-slice volume ``(1, y, x)``; a colour PNG is refused.

    Colours are not split into channels here: a case's channels are its files (CASE_0000, ...) as
    declared in dataset.json, and silently dropping or merging colours would change the input.
    """
    components, image = _png_header_components(path), None  # SimpleITK cannot open gray+alpha PNGs at all
    if components == 1:
        image = read_sitk(path)
        components = image.GetNumberOfComponentsPerPixel()  # e.g. a JPEG named .png
    if components != 1:
        raise input_error(path, f"is a colour PNG ({components} components per pixel); images and labels "
                                "must be single-channel (grayscale)",
                          "convert it to grayscale (a label: one integer per pixel), or store each colour of an "
                          "image as its own grayscale channel file CASE_0000.png, CASE_0001.png, CASE_0002.png "
                          "and list them in channel_names")
    spacing_x, spacing_y = image.GetSpacing()  # 1, 1 unless the file records a pixel size
    geometry = Geometry((spacing_x, spacing_y, 1.0), (0.0, 0.0, 0.0), IDENTITY)
    return sitk.GetArrayFromImage(image)[np.newaxis], geometry, 3, 1


def _read_3d(path: Path) -> tuple[np.ndarray, Geometry, int, int]:
    if not path.is_file():
        raise input_error(path, "file does not exist", "check the path, or re-create the dataset folder")
    voxels, geometry, dimension, components = _read_voxels(path)
    if dimension != 3 or components != 1:
        raise input_error(path, f"is not a single-channel 3D image (dimension {dimension}, "
                                f"{components} components per voxel)",
                          "store each channel as its own 3D file CASE_0000, CASE_0001, ... "
                          "(versemi_convert msd splits 4D files)")
    return voxels, geometry, dimension, components


def _unreadable(path: Path, exc: Exception):
    lines = str(exc).strip().splitlines()
    detail = lines[-1] if lines else type(exc).__name__
    return input_error(path, f"cannot be read as an image ({detail[:200]})",
                       "replace it with an intact copy in a format SimpleITK reads "
                       f"({', '.join(SUPPORTED_ENDINGS)})")


def read_image(paths: Sequence[str | Path]) -> tuple[np.ndarray, Geometry]:
    """Read the channel files of one case into a float32 ``(c, z, y, x)`` array and its geometry.

    All channels must share shape and geometry; the geometry of the first channel is returned.
    """
    arrays, geometry = [], None
    for path in map(Path, paths):
        voxels, g, dimension, components = _read_3d(path)
        array = voxels.astype(np.float32, copy=False)
        if geometry is None:
            geometry = g
        elif array.shape != arrays[0].shape or not g.matches(geometry):
            raise input_error(path, "channel differs in shape or geometry from the case's first channel",
                              "resample all channels of a case onto the same voxel grid")
        arrays.append(array)
    if geometry is None:
        raise ValueError("read_image needs at least one path")
    return np.stack(arrays), geometry


LABEL_RANGE = np.iinfo(np.int16)  # segmentations are held as int16


def read_label(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a segmentation as an integer ``(z, y, x)`` array and its geometry.

    A label stored as float is accepted when every value is integral (real datasets ship such
    files); fractions, NaN and infinities are refused rather than rounded into some label.
    """
    array, geometry, _, _ = _read_3d(Path(path))
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array) | (np.rint(array) != array)
        if bad.any():
            examples = ", ".join(f"{v:g}" for v in np.unique(array[bad])[:3])
            raise input_error(path, f"segmentation holds non-integer values ({examples}) in "
                                    f"{int(bad.sum())} voxel(s)",
                              "store labels as integers 0, 1, 2, ... as declared in dataset.json (a label "
                              "resampled with linear interpolation must be resampled with nearest neighbour)")
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < LABEL_RANGE.min or high > LABEL_RANGE.max:  # the cast below would wrap them into other labels
        raise input_error(path, f"segmentation holds values from {low:g} to {high:g}, outside the label range "
                                f"{LABEL_RANGE.min}..{LABEL_RANGE.max}",
                          "store labels as integers 0, 1, 2, ... as declared in dataset.json")
    return array.astype(np.int16, copy=False), geometry


def write_image(array: np.ndarray, geometry: Geometry, path: str | Path) -> None:
    """Write a ``(z, y, x)`` array with ``geometry`` to ``path`` atomically (format from the ending).

    A ``.png`` path takes a one-slice integer label map (values 0..255), written as 8-bit grayscale.
    """
    path = Path(path)
    ending = file_ending(path)
    if not ending:
        raise input_error(path, "unsupported file ending", f"use one of {', '.join(SUPPORTED_ENDINGS)}")
    image = _png_label_image(array, geometry, path) if ending == ".png" else \
        geometry.apply_to(sitk.GetImageFromArray(array))
    with atomic_path(path, suffix=ending) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)


def _png_label_image(array: np.ndarray, geometry: Geometry, path: Path) -> sitk.Image:
    """A one-slice label map as an 8-bit 2D image; anything PNG would store wrongly is refused."""
    fix = ("write it as .nii.gz (predictions take the ending of their images: convert those to .nii.gz); "
           "PNG holds one 2D slice of integers 0..255")
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:  # SimpleITK would silently keep only the first slice
        raise input_error(path, f"array of shape {array.shape} is not a single 2D slice", fix)
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise input_error(path, f"{array.dtype} values (probabilities or intensities) cannot be stored as a PNG "
                                "label map", fix)
    if array.size and (array.min() < 0 or array.max() > 255):
        raise input_error(path, f"label values {array.min()}..{array.max()} do not fit an 8-bit PNG (0..255)", fix)
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(geometry.spacing[:2])  # PNG keeps the pixel size only: no origin, direction or z
    return image
