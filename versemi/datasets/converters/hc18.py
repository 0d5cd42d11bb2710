"""HC18 fetal head ultrasound challenge, training set: 2D PNG images with drawn head outlines.

The source folder holds ``training_set/NNN_HC.png`` (greyscale), ``training_set/NNN_HC_Annotation.png``
(the head's outline, a thin ellipse drawn in 0/255) and ``training_set_pixel_size_and_HC.csv``
(filename, pixel size in mm, head circumference in mm). Every image of the csv is written as a
one-slice volume (z, y, x) = (1, height, width) with spacing (1, pixel, pixel) mm, origin 0 and
identity direction; its label is the head up to the centre of the drawn line, 1 = head.

The drawn line is 2 to 3 pixels wide, and the challenge's ellipse (the csv's head circumference)
runs along its centre. So a label pixel is either inside the line or a line pixel at least as
close to the inside as to the outside; the ellipse fitted to such a label's outline gives the
csv's circumference to within 0.04 mm on the training set, where the outline filled in whole
(its outer edge) gives 1.1 mm more on average, and up to 2.7 mm (the line's width in mm varies
with the pixel size, so no model could learn that excess).

Several images can show one subject: ``NNN_2HC.png``, ``NNN_3HC.png`` go with ``NNN_HC.png``. The
case id is ``hc18_`` plus the file stem without ``HC``: ``hc18_001`` for ``001_HC.png``,
``hc18_001_2`` for ``001_2HC.png``. ``case_order`` sorts by subject number, then image number
(``NNN_HC`` first), and ``case_groups`` maps every case to its subject (``"001"``) so that
cross-validation keeps a subject's images in one fold.

``test_ids`` holds cases out as a labeled test set (imagesTs/labelsTs), which no training or
planning reads; they must be whole subjects, so that no subject is seen in training and scored
in the test. ``case_order``, ``case_groups`` and ``numTraining`` list the training cases only.

An outline counts as open (an InputError) when filling it encloses fewer than 1 % of the image's
pixels besides the outline itself: a closed head outline encloses 5 % or more in the challenge's
images, an outline with a gap encloses nothing. Every ``*HC.png`` of ``training_set/`` needs a csv
row, even when ``ids`` selects a few cases; the head circumference column is not read.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ...errors import input_error
from ..io import Geometry, read_sitk
from ..layout import IMAGES_TR, IMAGES_TS, LABELS_TR, LABELS_TS, write_dataset_json
from ._output import binary_label, building, prepare_output, progress, require_dir, write_channels, write_label

IMAGE_FOLDER = "training_set"
CSV_NAME = "training_set_pixel_size_and_HC.csv"
ANNOTATION_SUFFIX = "_Annotation"
HC18_CHANNELS = ["US"]
HC18_LABELS = {"background": 0, "head": 1}
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
MIN_ENCLOSED_FRACTION = 0.01
_IMAGE_NAME = re.compile(r"^(?P<subject>\d+)_(?P<image>\d*)HC\.png$")
FIX_FOLDER = f"point to the HC18 folder holding {IMAGE_FOLDER}/ and {CSV_NAME}"


@dataclass(frozen=True)
class Hc18Image:
    """One image listed in the csv, with where it comes from."""

    name: str  # e.g. 001_2HC.png
    pixel_mm: float
    line: int  # in the csv, for messages

    @property
    def subject(self) -> str:
        return _IMAGE_NAME.match(self.name)["subject"]

    @property
    def image_number(self) -> int:
        return int(_IMAGE_NAME.match(self.name)["image"] or 1)

    @property
    def case_id(self) -> str:
        number = _IMAGE_NAME.match(self.name)["image"]
        return f"hc18_{self.subject}" + (f"_{number}" if number else "")

    @property
    def annotation_name(self) -> str:
        return self.name[: -len(".png")] + f"{ANNOTATION_SUFFIX}.png"


def read_pixel_sizes(path: Path) -> list[Hc18Image]:
    """The images of the csv in file order; a malformed row is an InputError naming its line."""
    if not path.is_file():
        raise input_error(path, "is missing", FIX_FOLDER)
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise input_error(path, f"cannot be read as a csv file ({exc})",
                          "restore the challenge's original csv") from exc
    images, seen = [], {}
    for line, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or (line == 1 and cells[0].lower() == "filename"):
            continue
        name = cells[0]
        if not _IMAGE_NAME.match(name) or len(cells) < 2:
            raise input_error(path, f"line {line} ({','.join(cells)}) is not 'NNN_HC.png,pixel size(mm),...'",
                              "restore the challenge's original csv: one row per image, named like 001_HC.png "
                              "or 001_2HC.png")
        try:
            pixel_mm = float(cells[1])
        except ValueError:
            pixel_mm = math.nan
        if not (math.isfinite(pixel_mm) and pixel_mm > 0):
            raise input_error(path, f"line {line} gives {name} the pixel size {cells[1]!r}, not a positive number "
                                    "of mm", f"write the pixel size of {name} in mm, as the challenge's csv does")
        if name in seen:
            raise input_error(path, f"lists {name} twice (lines {seen[name]} and {line})", "keep one row per image")
        seen[name] = line
        images.append(Hc18Image(name, pixel_mm, line))
    return images


def _check_listing(source: Path, images: list[Hc18Image], selected: list[Hc18Image]) -> None:
    """Every image has a csv row, every selected row its image and annotation."""
    folder, listed = source / IMAGE_FOLDER, {image.name for image in images}
    for path in sorted(folder.glob("*HC.png")):
        if path.name not in listed:
            raise input_error(path, f"has no row in {CSV_NAME}",
                              f"add the row '{path.name},PIXEL_SIZE_MM,HC_MM' to the csv, or remove the image")
    for image in selected:
        if not (folder / image.name).is_file():
            raise input_error(folder / image.name, f"is missing, but line {image.line} of {CSV_NAME} lists it",
                              "restore the image from the HC18 download, or remove its row from the csv")
        if not (folder / image.annotation_name).is_file():
            raise input_error(folder / image.annotation_name, f"is missing (the head outline of {image.name})",
                              "restore the annotation from the HC18 download, or remove the image and its csv row")


def _select(images: list[Hc18Image], ids: Sequence[str] | None, csv_path: Path) -> list[Hc18Image]:
    """The images to convert (``ids``: those case ids only), by subject then image number."""
    if ids is not None:
        by_id = {image.case_id: image for image in images}
        unknown = [i for i in dict.fromkeys(ids) if i not in by_id]
        if unknown:
            raise input_error(csv_path, f"lists no image for the case id(s) {unknown[:5]}",
                              "give case ids of listed images: hc18_001 for 001_HC.png, hc18_001_2 for 001_2HC.png")
        images = [by_id[i] for i in dict.fromkeys(ids)]
    return sorted(images, key=lambda image: (int(image.subject), image.image_number, image.name))


def _read_png(path: Path) -> np.ndarray:
    """A greyscale PNG as a (height, width) array."""
    image = read_sitk(path)
    if image.GetDimension() != 2 or image.GetNumberOfComponentsPerPixel() != 1:
        raise input_error(path, f"is not a 2D greyscale image ({image.GetDimension()}D, "
                                f"{image.GetNumberOfComponentsPerPixel()} components per pixel)",
                          "restore the challenge's original greyscale PNG")
    return sitk.GetArrayFromImage(image)


def head_mask(outline: np.ndarray, path: Path) -> np.ndarray:
    """The head up to the centre of the drawn outline: the enclosed pixels, and the outline's pixels
    at least as close to them as to the outside; an outline enclosing too little is an InputError."""
    filled = ndimage.binary_fill_holes(outline)
    inside = filled & ~outline
    enclosed = int(inside.sum())
    if enclosed < MIN_ENCLOSED_FRACTION * outline.size:
        raise input_error(path, f"outline is open: filling it encloses {enclosed} pixel(s), under "
                                f"{MIN_ENCLOSED_FRACTION:.0%} of the image",
                          "restore the annotation from the HC18 download, or close the drawn ellipse")
    to_inside = ndimage.distance_transform_edt(~inside)
    to_outside = ndimage.distance_transform_edt(filled)
    return (inside | (outline & (to_inside <= to_outside))).astype(np.uint8)


def _held_out(selected: list[Hc18Image], test_ids: Sequence[str], csv_path: Path) -> set[str]:
    """The case ids of ``test_ids``, checked: converted cases, whole subjects."""
    held_out, converted = set(test_ids), {image.case_id for image in selected}
    unknown = sorted(held_out - converted)
    if unknown:
        raise input_error(csv_path, f"gives no converted case for the test id(s) {unknown[:5]}",
                          "hold out case ids of the converted images: hc18_001 for 001_HC.png")
    split = sorted({image.subject for image in selected if image.case_id in held_out}
                   & {image.subject for image in selected if image.case_id not in held_out})
    if split:
        raise input_error(csv_path, f"subject(s) {split[:5]} would have images in both the training and the test "
                                    "cases", "hold out every image of a subject (NNN_HC, NNN_2HC, ...) or none")
    return held_out


def convert_hc18(source: Path, output: Path, *, overwrite: bool = False, show_progress: bool = True,
                 ids: Sequence[str] | None = None, test_ids: Sequence[str] = ()) -> Path:
    """Convert the HC18 training set into a raw dataset at ``output``; returns ``output``.

    ``ids`` converts only those cases (e.g. ``["hc18_001", "hc18_001_2"]``); ``test_ids`` puts those
    cases (whole subjects) into imagesTs/labelsTs instead of imagesTr/labelsTr.
    """
    source, output = Path(source), Path(output)
    require_dir(source, FIX_FOLDER)
    require_dir(source / IMAGE_FOLDER, FIX_FOLDER)
    prepare_output(source, output, overwrite)
    csv_path = source / CSV_NAME
    images = read_pixel_sizes(csv_path)
    if not images:
        raise input_error(csv_path, "lists no images", "restore the challenge's original csv")
    selected = _select(images, ids, csv_path)
    _check_listing(source, images, selected)
    held_out = _held_out(selected, test_ids, csv_path)
    training = [image for image in selected if image.case_id not in held_out]
    with building(output) as tmp:
        for image in progress(selected, show_progress, "hc18"):
            pixels = _read_png(source / IMAGE_FOLDER / image.name)
            annotation_path = source / IMAGE_FOLDER / image.annotation_name
            outline = _read_png(annotation_path)
            if outline.shape != pixels.shape:
                raise input_error(annotation_path, f"is {outline.shape[1]} x {outline.shape[0]} pixels, its image "
                                                   f"{image.name} {pixels.shape[1]} x {pixels.shape[0]}",
                                  f"use the annotation that belongs to {image.name}")
            mask = head_mask(binary_label(outline, annotation_path).astype(bool), annotation_path)
            geometry = Geometry((image.pixel_mm, image.pixel_mm, 1.0), (0.0, 0.0, 0.0), IDENTITY)
            tested = image.case_id in held_out
            write_channels(tmp / (IMAGES_TS if tested else IMAGES_TR), image.case_id, [pixels[np.newaxis]], geometry)
            write_label(tmp / (LABELS_TS if tested else LABELS_TR), image.case_id, mask[np.newaxis], geometry)
        write_dataset_json(tmp, HC18_CHANNELS, HC18_LABELS, len(training),
                           case_order=[image.case_id for image in training],
                           case_groups={image.case_id: image.subject for image in training})
    return output
