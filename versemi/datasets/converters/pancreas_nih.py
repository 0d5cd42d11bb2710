"""NIH Pancreas-CT (TCIA): one DICOM series per patient plus ``labelNNNN.nii.gz`` segmentations.

Patient folders are the folders named like ``PANCREAS_0001`` anywhere under the source (e.g.
``Pancreas-CT/PANCREAS_0001/<study>/<series>/*.dcm``); inside each, the one folder holding
``.dcm`` files is read as a series with SimpleITK. The case id is ``pancreas_0001``; cases are
written in ascending number. Images keep the DICOM geometry and Hounsfield units (int16).

Labels: the NIH label headers are known not to match the DICOM geometry, so a label whose array
shape equals the image's is written with the *image's* geometry (its own header is ignored). A
label stored transposed (x and y swapped; detectable only when the image is not square) is
transposed back; any other shape is an InputError. Patients without a label file are written to
imagesUnlabeled.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ...errors import input_error
from ..io import Geometry, read_sitk
from ..layout import IMAGES_TR, IMAGES_UNLABELED, LABELS_TR, write_dataset_json
from ._output import binary_label, building, prepare_output, progress, require_dir, write_channels, write_label

PATIENT = re.compile(r"^pancreas[_-]?(\d+)$", re.IGNORECASE)
LABEL_FILE = re.compile(r"^label(\d+)\.nii(\.gz)?$", re.IGNORECASE)
DEFAULT_LABELS = ("TCIA_pancreas_labels-02-05-2017", "labels")


def _patient_folders(source: Path, skip: Path) -> dict[int, Path]:
    """Patient number -> its folder, for every ``PANCREAS_NNNN`` folder under ``source``."""
    found: dict[int, Path] = {}
    skip = skip.resolve()
    for root, dirs, _ in os.walk(source):
        for name in sorted(dirs):
            match = PATIENT.match(name)
            if match:
                number = int(match[1])
                if number in found:
                    raise input_error(Path(root) / name, f"is a second folder for patient {number} "
                                                         f"(first: {found[number]})", "keep one folder per patient")
                found[number] = Path(root) / name
        dirs[:] = [d for d in dirs if not PATIENT.match(d) and (Path(root) / d).resolve() != skip]
    return found


def _series_folder(patient: Path) -> Path:
    folders = sorted({Path(root) for root, _, files in os.walk(patient)
                      if any(f.lower().endswith(".dcm") for f in files)})
    if len(folders) != 1:
        problem = "holds no .dcm files" if not folders else f"holds .dcm files in {len(folders)} folders"
        raise input_error(patient, problem, "keep exactly one DICOM series (the CT) per patient folder")
    return folders[0]


def _read_series(folder: Path) -> tuple[np.ndarray, Geometry]:
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        if len(series) != 1:
            raise input_error(folder, f"holds {len(series)} DICOM series", "keep one DICOM series per patient")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
        image = reader.Execute()
    except RuntimeError as exc:
        raise input_error(folder, f"cannot be read as a DICOM series ({str(exc).strip()[-200:]})",
                          "replace the series with an intact download") from exc
    array = sitk.GetArrayFromImage(image)
    return np.clip(array, -32768, 32767).astype(np.int16), Geometry.of(image)


def _label_on_image_grid(label_path: Path, shape: tuple[int, ...]) -> np.ndarray:
    label = sitk.GetArrayFromImage(read_sitk(label_path))
    if label.shape == shape:
        return binary_label(label, label_path)
    if label.ndim == 3 and label.transpose(0, 2, 1).shape == shape:
        return binary_label(label.transpose(0, 2, 1), label_path)
    raise input_error(label_path, f"has shape {label.shape[::-1]}, its DICOM image {shape[::-1]} (x, y, z)",
                      "use the label file that belongs to this patient")


def convert_pancreas_nih(source: Path, output: Path, *, overwrite: bool = False, show_progress: bool = True,
                         labels: Path | None = None) -> Path:
    """Convert the NIH Pancreas-CT DICOM folders and labels into a raw dataset at ``output``."""
    source, output = Path(source), Path(output)
    require_dir(source, "point to the folder holding the PANCREAS_NNNN DICOM folders")
    prepare_output(source, output, overwrite)
    if labels is None:
        labels = next((source / n for n in DEFAULT_LABELS if (source / n).is_dir()), source / DEFAULT_LABELS[-1])
    labels = Path(labels)
    require_dir(labels, "pass labels=<folder with labelNNNN.nii.gz> (--labels)")
    label_files = {int(m[1]): p for p in labels.iterdir() if (m := LABEL_FILE.match(p.name))}
    patients = _patient_folders(source, skip=labels)
    if not patients:
        raise input_error(source, "holds no PANCREAS_NNNN folders", "point to the Pancreas-CT download folder")
    series = {number: _series_folder(patients[number]) for number in sorted(patients)}
    order = [f"pancreas_{n:04d}" for n in series if n in label_files]
    with building(output) as tmp:
        for number, folder in progress(series.items(), show_progress, "pancreas-nih"):
            case_id = f"pancreas_{number:04d}"
            image, geometry = _read_series(folder)
            if number not in label_files:
                write_channels(tmp / IMAGES_UNLABELED, case_id, [image], geometry)
                continue
            label = _label_on_image_grid(label_files[number], image.shape)
            write_channels(tmp / IMAGES_TR, case_id, [image], geometry)
            write_label(tmp / LABELS_TR, case_id, label, geometry)
        write_dataset_json(tmp, ["CT"], {"background": 0, "pancreas": 1}, len(order), case_order=order)
    return output
