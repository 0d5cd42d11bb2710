"""Prediction in the images' own geometry and format, nnU-Net style.

The jobs around it have their own modules: ``models`` (checkpoints, ensembles),
``prompt_names``, ``cases`` (inputs and outputs checked) and ``sliding_window``; their names are
available from here too.

    ensemble = load_models(results_root() / "DemoLA_DemoPancreas", folds=["0", "1"])
    predict_cases(["imagesTs"], "predictions", "DemoLA", ensemble)

Per case, one at a time: read the channel files, crop to the nonzero region, normalize and
resample as the prompt's dataset plan says (exactly as the preprocessing cache did), Gaussian
sliding window with the checkpoint's patch size and mirroring over the 3 spatial axes (8 flip
combinations averaged), the mean over folds, the probabilities resampled back to the cropped shape
(trilinear), threshold at 0.5, un-crop, optionally the largest connected component, then written
as uint8 in the input's file format and geometry (spacing, origin, direction). With several
prompts (``predict_case_prompts``) the case is read once, every window goes through the backbone
once for all the prompts of a dataset, and the prompts become one label map (``label_map``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice
from tqdm import tqdm

from ..atomic import atomic_path
from ..datasets.io import Geometry, read_image, write_image
from ..errors import InputError, Problem, input_error
from ..plans.view import PlansView
from ..preprocessing.cropping import crop, nonzero_bbox
from ..preprocessing.normalization import normalize
from ..preprocessing.resampling import resample_image
from .cases import CHANNEL_NAME, InputCase, _discover, _header_problems, _output_problems, find_cases  # noqa: F401
from .label_map import LabelTable, compose, label_table, write_label_table
from .models import (CHECKPOINT_KEYS, CHECKPOINT_KINDS, FOLD_ORDER, Ensemble, FoldModel, _canonical,  # noqa: F401
                     checkpoint_paths, find_experiment_dir, load_models)
from .postprocessing import largest_connected_component
from .prompt_names import NNUNET_DATASET, prompt_table, resolve_prompt, resolve_prompts  # noqa: F401
from .sliding_window import (_is_oom, ensemble_probabilities, mirror_axes, resize_probabilities,  # noqa: F401
                             sliding_window_probabilities)

THRESHOLD = 0.5


def read_cropped(ensemble: Ensemble, files: Sequence[str | Path]):
    """(the case's image cropped to its nonzero region, its geometry, its full (z, y, x) shape, the crop box)."""
    image, geometry = read_image(files)
    if image.shape[0] != ensemble.in_channels:
        raise input_error(files[0], f"case has {image.shape[0]} channel(s); the model takes {ensemble.in_channels}",
                          "give one file per channel, CASE_0000, CASE_0001, ...")
    bbox = nonzero_bbox(image)
    return np.ascontiguousarray(crop(image, bbox)), geometry, image.shape[1:], bbox  # a copy where cropping cut


@dataclass
class CasePrediction:
    mask: np.ndarray                   # uint8 0/1, the input's (z, y, x) shape
    geometry: Geometry                 # the input's
    probabilities: np.ndarray | None   # float32, the input's shape (0 outside the nonzero crop), if asked for


def predict_case(ensemble: Ensemble, files: Sequence[str | Path], prompt: str | dict, step: float = 0.5,
                 mirroring: bool = True, lcc: bool = False, keep_probabilities: bool = False, *, patch_size=None,
                 overlap: float | Sequence[float] | None = None, blend: str = "gaussian") -> CasePrediction:
    """Segment one case (its channel files) with one prompt, in the input's own voxel grid.

    ``patch_size`` (window (z, y, x) in the plan's grid; None: the checkpoint's patch), ``overlap``
    and ``blend`` choose another sliding window (see ``sliding_window_probabilities``)."""
    prompt = resolve_prompt(ensemble.plans, prompt) if isinstance(prompt, str) else prompt
    plan = PlansView(ensemble.plans).dataset_plan(prompt["dataset"])
    cropped, geometry, shape, bbox = read_cropped(ensemble, files)
    cropped_shape = cropped.shape[1:]
    data = resample_image(normalize(cropped, plan["normalization"]), geometry.spacing_zyx, plan["target_spacing"])
    del cropped
    probabilities = resize_probabilities(ensemble_probabilities(ensemble, data, prompt["index"], step, mirroring,
                                                                patch_size=patch_size, overlap=overlap, blend=blend),
                                         cropped_shape)
    del data
    region = bounding_box_to_slice(bbox)
    mask = np.zeros(shape, np.uint8)
    mask[region] = probabilities > THRESHOLD
    if lcc:
        mask = largest_connected_component(mask).astype(np.uint8)
    full = None
    if keep_probabilities:
        full = np.zeros(shape, np.float32)
        full[region] = probabilities
    return CasePrediction(mask, geometry, full)


@dataclass
class LabelMapPrediction:
    labels: np.ndarray                 # one label map in the input's (z, y, x) shape, values from ``table``
    geometry: Geometry                 # the input's
    table: LabelTable
    probabilities: np.ndarray | None   # float32 (K, z, y, x), one channel per prompt, if asked for


def predict_case_prompts(ensemble: Ensemble, files: Sequence[str | Path], prompts: Sequence[dict], step: float = 0.5,
                         mirroring: bool = True, lcc: Iterable[int] = (), keep_probabilities: bool = False
                         ) -> LabelMapPrediction:
    """Segment one case with several prompts into one label map (see ``label_map``), in the input's
    own voxel grid. The image is read and cropped once; per dataset among the prompts it is
    normalized and resampled as that dataset's plan says, and every window goes through the
    backbone once for all of that dataset's prompts. ``lcc``: prompt indices that keep only their
    largest connected component."""
    prompts = list(prompts)
    cropped, geometry, shape, bbox = read_cropped(ensemble, files)
    probabilities = np.zeros((len(prompts), *cropped.shape[1:]), np.float32)
    datasets = list(dict.fromkeys(p["dataset"] for p in prompts))
    for dataset in datasets:
        plan = PlansView(ensemble.plans).dataset_plan(dataset)
        rows = [k for k, p in enumerate(prompts) if p["dataset"] == dataset]
        source = cropped if dataset == datasets[-1] else cropped.copy()  # normalize() works in place
        data = resample_image(normalize(source, plan["normalization"]), geometry.spacing_zyx, plan["target_spacing"])
        stitched = ensemble_probabilities(ensemble, data, [prompts[k]["index"] for k in rows], step, mirroring)
        probabilities[rows] = resize_probabilities(stitched, cropped.shape[1:])
    del cropped
    table = label_table(prompts)
    region = bounding_box_to_slice(bbox)
    labels_cropped = compose(probabilities, table, set(lcc))
    labels = np.zeros(shape, labels_cropped.dtype)
    labels[region] = labels_cropped
    full = None
    if keep_probabilities:
        full = np.zeros((len(prompts), *shape), np.float32)
        full[(slice(None), *region)] = probabilities
    return LabelMapPrediction(labels, geometry, table, full)


def write_probabilities(probabilities: np.ndarray, path: Path, prompts: Sequence[dict] | None = None) -> None:
    """``probabilities`` (float32, (K,) z, y, x) in an npz file, written atomically; with several
    prompts also their names (``prompts``, one ``dataset/label`` per channel)."""
    extra = {"prompts": np.array([f"{p['dataset']}/{p['label']}" for p in prompts])} if prompts else {}
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, probabilities=probabilities.astype(np.float32, copy=False), **extra)


def predict_cases(inputs: Sequence[str | Path], output_folder: str | Path, prompt: str | dict | Sequence[dict],
                  ensemble: Ensemble, step: float = 0.5, mirroring: bool = True, lcc: bool | Iterable[int] = False,
                  save_probabilities: bool = False, overwrite: bool = False, show_progress: bool = True) -> list[Path]:
    """Predict every case of ``inputs`` (folders of ``CASE_XXXX.ext`` files, or files) into
    ``output_folder/CASE.ext`` (same format and geometry as the input; ``CASE_prob.npz`` too with
    ``save_probabilities``). One prompt: a 0/1 mask. Several prompts (a list): one label map per
    case and ``labels.json``, the table of its values (see ``label_map``). Every input and output
    problem is reported before anything is written; existing outputs are replaced only with
    ``overwrite``. ``lcc``: True/False for every prompt, or the prompt indices that keep only their
    largest connected component. Returns the segmentations written."""
    prompts = [resolve_prompt(ensemble.plans, prompt) if isinstance(prompt, str) else prompt] \
        if isinstance(prompt, (str, dict)) else list(prompt)
    if not prompts:
        raise input_error("-p", "no prompt selected", f"name one or more of: {prompt_table(ensemble.plans)}, or all")
    lcc_prompts = {p["index"] for p in prompts} if lcc is True else set() if lcc is False else set(lcc)
    several = len(prompts) > 1
    if not 0 < step <= 1:
        raise input_error(f"--step {step}", "must lie in (0, 1] (fraction of the patch between windows)",
                          "use e.g. 0.5 (nnU-Net's default)")
    inputs, output_folder = [Path(p) for p in inputs], Path(output_folder)
    cases, problems = _discover(inputs, ensemble.in_channels)
    for case in cases:
        problems += _header_problems(case)
    problems += _output_problems(cases, inputs, output_folder, save_probabilities, overwrite)
    table = label_table(prompts)
    if several:
        problems += _label_table_problems(table, output_folder, overwrite)
    if problems:
        raise InputError(problems)
    if several:
        write_label_table(table, output_folder)
    written = []
    for case in tqdm(cases, desc="predicting", unit="case", disable=not show_progress, dynamic_ncols=True):
        target = case.output_path(output_folder)
        if several:
            result = predict_case_prompts(ensemble, case.files, prompts, step, mirroring, lcc_prompts,
                                          keep_probabilities=save_probabilities)
            write_image(result.labels, result.geometry, target)
        else:
            result = predict_case(ensemble, case.files, prompts[0], step, mirroring, bool(lcc_prompts),
                                  keep_probabilities=save_probabilities)
            write_image(result.mask, result.geometry, target)
        if save_probabilities:
            write_probabilities(result.probabilities, case.probabilities_path(output_folder),
                                prompts if several else None)
        written.append(target)
    return written


def _label_table_problems(table: LabelTable, output_folder: Path, overwrite: bool) -> list[Problem]:
    """An existing labels.json of other values would no longer describe the folder's label maps."""
    path = Path(output_folder) / "labels.json"
    if path.is_file() and not overwrite and json.loads(path.read_text()) != table.to_json():
        return [Problem(str(path), "exists and describes other labels than this prediction's",
                        "pass --overwrite to replace it, or choose another output folder")]
    return []
