"""Medical Segmentation Decathlon task folder (Task01_BrainTumour, Task02_Heart, ...).

The MSD ``dataset.json`` lists the cases (``training``: image/label pairs, ``test``: images) and
names the channels (``modality``) and labels (``{"0": "background", ...}``). Multi-modal images are
4D (x, y, z, c): each channel becomes its own 3D file ``CASE_000c.nii.gz`` with the 3D part of the
geometry. Labels keep their own geometry. The training list order becomes ``case_order``. macOS
``._*`` entries are skipped. ``test_ids`` holds training cases out as a labeled test set
(imagesTs/labelsTs), which no training or planning reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ...atomic import read_json
from ...errors import input_error
from ..io import Geometry, read_label, read_sitk
from ..layout import IMAGES_TR, IMAGES_TS, LABELS_TR, LABELS_TS, write_dataset_json
from ._output import building, integer_label, prepare_output, progress, require_dir, write_channels, write_label

FIX_FOLDER = "point to an MSD task folder (it holds dataset.json, imagesTr, labelsTr)"


def _load_meta(source: Path) -> dict:
    path = source / "dataset.json"
    if not path.is_file():
        raise input_error(path, "is missing", FIX_FOLDER)
    try:
        meta = read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise input_error(path, f"is not valid JSON ({exc})", "restore the task's original dataset.json") from exc
    missing = [key for key in ("modality", "labels", "training") if key not in meta]
    if missing:
        raise input_error(path, f"lacks the key(s) {', '.join(missing)}", "restore the task's original dataset.json")
    return meta


def _case_id(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else path.stem


def _read_channels(path: Path, count: int) -> tuple[list[np.ndarray], Geometry]:
    """The 3D channels of a 3D or 4D (x, y, z, c) file, as (z, y, x) arrays with the 3D geometry."""
    image = read_sitk(path)
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        volumes = [sitk.Extract(image, size[:3] + [0], [0, 0, 0, c],
                                sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX) for c in range(size[3])]
    elif image.GetDimension() == 3:
        components = image.GetNumberOfComponentsPerPixel()
        volumes = [image] if components == 1 else [sitk.VectorIndexSelectionCast(image, c) for c in range(components)]
    else:
        raise input_error(path, f"is a {image.GetDimension()}D image", "MSD images are 3D or 4D (x, y, z, channel)")
    if len(volumes) != count:
        raise input_error(path, f"has {len(volumes)} channel(s) but dataset.json's modality lists {count}",
                          "restore the task's original image or dataset.json")
    return [sitk.GetArrayFromImage(v) for v in volumes], Geometry.of(volumes[0])


def convert_msd(source: Path, output: Path, *, overwrite: bool = False, show_progress: bool = True,
                test_ids: Sequence[str] = ()) -> Path:
    """Convert an MSD task folder into a raw dataset at ``output``; returns ``output``. Training cases
    named in ``test_ids`` go to imagesTs/labelsTs instead of imagesTr/labelsTr."""
    source, output = Path(source), Path(output)
    require_dir(source, FIX_FOLDER)
    prepare_output(source, output, overwrite)
    meta = _load_meta(source)
    json_path = source / "dataset.json"
    try:
        channels = [meta["modality"][k] for k in sorted(meta["modality"], key=int)]
        labels = {name: int(value) for value, name in meta["labels"].items()}
        training = [(source / e["image"], source / e["label"]) for e in meta["training"]]
        test = [source / (e["image"] if isinstance(e, dict) else e) for e in meta.get("test", [])]
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise input_error(json_path, f"is not in MSD format ({type(exc).__name__}: {exc})",
                          "restore the task's original dataset.json") from exc
    if len(labels) != len(meta["labels"]):
        raise input_error(json_path, "gives two label values the same name", "give each label value its own name")
    training = [(i, l) for i, l in training if not i.name.startswith("._")]
    test = [i for i in test if not i.name.startswith("._")]
    for path in [p for pair in training for p in pair] + test:
        if not path.is_file():
            raise input_error(path, "is missing (listed in dataset.json)", "restore the file from the MSD download")
    held_out = set(test_ids)
    unknown = held_out - {_case_id(image) for image, _ in training}
    if unknown:
        raise input_error(json_path, f"lists no training case {', '.join(sorted(unknown))} (given as test ids)",
                          "hold out only cases of dataset.json's training list")
    order = [_case_id(image) for image, _ in training if _case_id(image) not in held_out]
    declared = set(labels.values())
    jobs = [(image, label) for image, label in training] + [(image, None) for image in test]
    with building(output) as tmp:
        for image_path, label_path in progress(jobs, show_progress, "msd"):
            case_id = _case_id(image_path)
            arrays, geometry = _read_channels(image_path, len(channels))
            tested = label_path is None or case_id in held_out
            write_channels(tmp / (IMAGES_TS if tested else IMAGES_TR), case_id, arrays, geometry)
            if label_path is None:
                continue
            # read_label, not SimpleITK: SimpleITK would turn NaN voxels of a float label into background
            label, label_geometry = read_label(label_path)
            label = integer_label(label, label_path)
            if label.shape != arrays[0].shape:
                raise input_error(label_path, f"has shape {label.shape[::-1]}, its image {arrays[0].shape[::-1]}",
                                  "restore the label that belongs to the image")
            undeclared = set(np.flatnonzero(np.bincount(label.ravel(), minlength=256)).tolist()) - declared
            if undeclared:
                raise input_error(label_path, f"holds label values {sorted(undeclared)} not in dataset.json's labels",
                                  "restore the original label, or declare the values in dataset.json")
            write_label(tmp / (LABELS_TS if tested else LABELS_TR), case_id, label, label_geometry)
        write_dataset_json(tmp, channels, labels, len(order), case_order=order)
    return output
