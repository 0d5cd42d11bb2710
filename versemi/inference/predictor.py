"""Prediction in the images' own geometry and format, nnU-Net style.

The jobs around it have their own modules: ``models`` (ensembles of trained folds),
``prompt_names``, ``cases`` (inputs and outputs checked) and ``sliding_window``; their names are
available from here too. The checkpoints and where they lie are ``versemi.model``'s.

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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..atomic import atomic_path
from ..console import progress_bar
from ..datasets.io import Geometry, read_image, write_image
from ..errors import InputError, Problem, input_error
from ..locks import folder_lock
from ..model.plans_view import PlansView
from ..preprocessing.pipeline import CroppedImage, crop_to_nonzero, network_grid, resize_probabilities, uncrop
from .cases import CHANNEL_NAME, InputCase, _discover, _header_problems, _output_problems, find_cases  # noqa: F401
from .label_map import LabelTable, compose, label_table, write_label_table
from .models import Ensemble, FoldModel, _canonical, load_models  # noqa: F401
from .postprocessing import largest_connected_component
from .prompt_names import NNUNET_DATASET, prompt_table, resolve_prompt, resolve_prompts  # noqa: F401
from .sliding_window import _is_oom, ensemble_probabilities, mirror_axes, sliding_window_probabilities  # noqa: F401

THRESHOLD = 0.5


@dataclass
class PreparedCase:
    """A case read, cropped once, and brought onto the network grid of each dataset among the prompts."""

    geometry: Geometry
    cropped: CroppedImage
    inputs: list[tuple[list[int], np.ndarray]]  # per dataset: (rows of its prompts, network input (c, z, y, x))


def read_cropped(ensemble: Ensemble, files: Sequence[str | Path]) -> tuple[CroppedImage, Geometry]:
    """The case's image cropped to its nonzero region, and its geometry."""
    image, geometry = read_image(files)
    if image.shape[0] != ensemble.in_channels:
        raise input_error(files[0], f"case has {image.shape[0]} channel(s); the model takes {ensemble.in_channels}",
                          "give one file per channel, CASE_0000, CASE_0001, ...")
    return crop_to_nonzero(image, geometry.spacing_zyx), geometry


def prepare_case(ensemble: Ensemble, files: Sequence[str | Path], prompts: Sequence[dict]) -> PreparedCase:
    """Read and crop the case once; normalize and resample it by the plan of each dataset among
    ``prompts`` (``preprocessing.pipeline``, exactly as the preprocessing cache did)."""
    cropped, geometry = read_cropped(ensemble, files)
    datasets = list(dict.fromkeys(p["dataset"] for p in prompts))
    inputs = []
    for dataset in datasets:
        plan = PlansView(ensemble.plans).dataset_plan(dataset, ensemble.configuration)
        rows = [k for k, p in enumerate(prompts) if p["dataset"] == dataset]
        inputs.append((rows, network_grid(cropped, plan, keep_crop=dataset != datasets[-1])))
    return PreparedCase(geometry, cropped, inputs)


def network_probabilities(ensemble: Ensemble, prepared: PreparedCase, prompts: Sequence[dict], step: float = 0.5,
                          mirroring: bool = True, **window) -> list[tuple[list[int], torch.Tensor]]:
    """Per dataset, (rows of its prompts, their stitched probabilities (K, Z, Y, X) on its network
    grid): every window goes through the backbone once for all of that dataset's prompts.
    ``window``: patch_size, overlap, blend of ``ensemble_probabilities``."""
    return [(rows, ensemble_probabilities(ensemble, data, [prompts[k]["index"] for k in rows], step, mirroring,
                                          dataset=prompts[rows[0]]["dataset"], **window))
            for rows, data in prepared.inputs]


def cropped_probabilities(prepared: PreparedCase, stitched: list[tuple[list[int], torch.Tensor]],
                          count: int) -> np.ndarray:
    """(count, crop's z, y, x) float32: each dataset's probabilities resampled back to the crop."""
    probabilities = np.zeros((count, *prepared.cropped.shape), np.float32)
    for rows, p in stitched:
        probabilities[rows] = resize_probabilities(p, prepared.cropped.shape)
    return probabilities


@dataclass
class CasePrediction:
    mask: np.ndarray                   # uint8 0/1, the input's (z, y, x) shape
    geometry: Geometry                 # the input's
    probabilities: np.ndarray | None   # float32, the input's shape (0 outside the nonzero crop), if asked for


def mask_prediction(prepared: PreparedCase, stitched, lcc: bool = False,
                    keep_probabilities: bool = False) -> CasePrediction:
    """One prompt's probabilities -> its 0/1 mask in the input's grid (``p > 0.5``, then optionally
    the largest connected component)."""
    probabilities = cropped_probabilities(prepared, stitched, 1)[0]
    mask = uncrop((probabilities > THRESHOLD).astype(np.uint8), prepared.cropped)
    if lcc:
        mask = largest_connected_component(mask).astype(np.uint8)
    full = uncrop(probabilities, prepared.cropped) if keep_probabilities else None
    return CasePrediction(mask, prepared.geometry, full)


def predict_case(ensemble: Ensemble, files: Sequence[str | Path], prompt: str | dict, step: float = 0.5,
                 mirroring: bool = True, lcc: bool = False, keep_probabilities: bool = False, *, patch_size=None,
                 overlap: float | Sequence[float] | None = None, blend: str = "gaussian") -> CasePrediction:
    """Segment one case (its channel files) with one prompt, in the input's own voxel grid.

    ``patch_size`` (window (z, y, x) in the plan's grid; None: the checkpoint's patch), ``overlap``
    and ``blend`` choose another sliding window (see ``sliding_window_probabilities``)."""
    prompts = [resolve_prompt(ensemble.plans, prompt) if isinstance(prompt, str) else prompt]
    prepared = prepare_case(ensemble, files, prompts)
    stitched = network_probabilities(ensemble, prepared, prompts, step, mirroring, patch_size=patch_size,
                                     overlap=overlap, blend=blend)
    return mask_prediction(prepared, stitched, lcc, keep_probabilities)


@dataclass
class LabelMapPrediction:
    labels: np.ndarray                 # one label map in the input's (z, y, x) shape, values from ``table``
    geometry: Geometry                 # the input's
    table: LabelTable
    probabilities: np.ndarray | None   # float32 (K, z, y, x), one channel per prompt, if asked for


def label_map_prediction(prepared: PreparedCase, stitched, prompts: Sequence[dict], lcc: Iterable[int] = (),
                         keep_probabilities: bool = False) -> LabelMapPrediction:
    """Several prompts' probabilities -> one label map in the input's grid (``label_map.compose``)."""
    probabilities = cropped_probabilities(prepared, stitched, len(prompts))
    table = label_table(list(prompts))
    labels = uncrop(compose(probabilities, table, set(lcc)), prepared.cropped)
    full = uncrop(probabilities, prepared.cropped) if keep_probabilities else None
    return LabelMapPrediction(labels, prepared.geometry, table, full)


def predict_case_prompts(ensemble: Ensemble, files: Sequence[str | Path], prompts: Sequence[dict], step: float = 0.5,
                         mirroring: bool = True, lcc: Iterable[int] = (), keep_probabilities: bool = False
                         ) -> LabelMapPrediction:
    """Segment one case with several prompts into one label map (see ``label_map``), in the input's
    own voxel grid. The image is read and cropped once; per dataset among the prompts it is
    normalized and resampled as that dataset's plan says, and every window goes through the
    backbone once for all of that dataset's prompts. ``lcc``: prompt indices that keep only their
    largest connected component."""
    prompts = list(prompts)
    prepared = prepare_case(ensemble, files, prompts)
    stitched = network_probabilities(ensemble, prepared, prompts, step, mirroring)
    return label_map_prediction(prepared, stitched, prompts, lcc, keep_probabilities)


def write_probabilities(probabilities: np.ndarray, path: Path, prompts: Sequence[dict] | None = None) -> None:
    """``probabilities`` (float32, (K,) z, y, x) in an npz file, written atomically; with several
    prompts also their names (``prompts``, one ``dataset/label`` per channel)."""
    extra = {"prompts": np.array([f"{p['dataset']}/{p['label']}" for p in prompts])} if prompts else {}
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, probabilities=probabilities.astype(np.float32, copy=False), **extra)


def predict_cases(inputs: Sequence[str | Path], output_folder: str | Path, prompt: str | dict | Sequence[dict],
                  ensemble: Ensemble, step: float = 0.5, mirroring: bool = True, lcc: bool | Iterable[int] = False,
                  save_probabilities: bool = False, overwrite: bool = False, show_progress: bool = True,
                  background_io: bool = True, left_out: Sequence[tuple[dict, str]] = ()) -> list[Path]:
    """Predict every case of ``inputs`` (folders of ``CASE_XXXX.ext`` files, or files) into
    ``output_folder/CASE.ext`` (same format and geometry as the input; ``CASE_prob.npz`` too with
    ``save_probabilities``). One prompt: a 0/1 mask. Several prompts (a list): one label map per
    case and ``labels.json``, the table of its values (see ``label_map``). Every input and output
    problem is reported before anything is written; existing outputs are replaced only with
    ``overwrite``. ``lcc``: True/False for every prompt, or the prompt indices that keep only their
    largest connected component. ``background_io``: read the next case and write the previous one
    while the network runs (see ``_run_cases``). ``left_out``: (prompt, why) of structures not
    asked, recorded in ``labels.json`` (``--from-dataset``). Returns the segmentations written."""
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
    table = label_table(prompts, list(left_out))
    if several:
        problems += _label_table_problems(table, output_folder, overwrite)
    if problems:
        raise InputError(problems)

    def finish(case: InputCase, prepared: PreparedCase, stitched) -> Path:
        target = case.output_path(output_folder)
        if several:
            result = label_map_prediction(prepared, stitched, prompts, lcc_prompts, save_probabilities)
            write_image(result.labels, result.geometry, target)
        else:
            result = mask_prediction(prepared, stitched, bool(lcc_prompts), save_probabilities)
            write_image(result.mask, result.geometry, target)
        if save_probabilities:
            write_probabilities(result.probabilities, case.probabilities_path(output_folder),
                                prompts if several else None)
        return target

    # a second prediction into this folder at the same time would overwrite this one's files unasked
    with folder_lock(output_folder, "prediction"):
        if several:
            write_label_table(table, output_folder)
        return _run_cases(cases, lambda case: prepare_case(ensemble, case.files, prompts),
                          lambda prepared: network_probabilities(ensemble, prepared, prompts, step, mirroring),
                          finish, background_io, show_progress)


def _run_cases(cases: Sequence[InputCase], prepare, network, finish, background_io: bool,
               show_progress: bool) -> list[Path]:
    """``finish(case, prepared, network(prepared))`` for each case of ``prepare(case)``, in order.

    With ``background_io`` one thread reads and preprocesses the next case and another finishes
    and writes the previous one while the network runs, as nnU-Net's preprocessing iterator and
    export pool do; at most one case waits on each side, so memory stays bounded."""
    progress = progress_bar(total=len(cases), desc="predicting", unit="case", show=show_progress)
    written: list[Path] = []
    if not background_io:
        for case in cases:
            prepared = prepare(case)
            written.append(finish(case, prepared, network(prepared)))
            progress.update()
        progress.close()
        return written
    with ThreadPoolExecutor(1, thread_name_prefix="versemi-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="versemi-write") as writer:
        upcoming = reader.submit(prepare, cases[0]) if cases else None
        pending: Future | None = None
        for i, case in enumerate(cases):
            prepared = upcoming.result()
            if i + 1 < len(cases):
                upcoming = reader.submit(prepare, cases[i + 1])
            stitched = network(prepared)
            prepared.inputs = []  # the network input is no longer needed while the case is written
            if pending is not None:
                written.append(pending.result())
                progress.update()
            pending = writer.submit(finish, case, prepared, stitched)
        if pending is not None:
            written.append(pending.result())
            progress.update()
    progress.close()
    return written


def _label_table_problems(table: LabelTable, output_folder: Path, overwrite: bool) -> list[Problem]:
    """An existing labels.json of other values would no longer describe the folder's label maps."""
    path = Path(output_folder) / "labels.json"
    if path.is_file() and not overwrite and json.loads(path.read_text(encoding="utf-8")) != table.to_json():
        return [Problem(str(path), "exists and describes other labels than this prediction's",
                        "pass --overwrite to replace it, or choose another output folder")]
    return []
