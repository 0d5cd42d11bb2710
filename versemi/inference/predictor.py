"""Prediction in the images' own geometry and format, nnU-Net style.

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

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice
from monai.inferers import sliding_window_inference
from tqdm import tqdm

from .. import paths
from ..atomic import atomic_path
from ..datasets.io import SUPPORTED_ENDINGS, Geometry, file_ending, read_image, write_image
from ..errors import InputError, Problem, input_error
from ..plans.view import PlansView
from ..preprocessing.cropping import crop, nonzero_bbox
from ..preprocessing.normalization import normalize
from ..preprocessing.resampling import resample_image
from .label_map import LabelTable, compose, label_table, write_label_table
from .postprocessing import largest_connected_component

CHECKPOINT_KINDS = ("final", "best", "latest")
FOLD_ORDER = [str(i) for i in range(5)] + ["all"]
CHECKPOINT_KEYS = ("trainer", "fold", "configuration", "config", "plans", "network")
CHANNEL_NAME = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
NNUNET_DATASET = re.compile(r"^Dataset(\d{3})_(.+)$")
THRESHOLD = 0.5


# ----- models -----
@dataclass
class FoldModel:
    """One trained fold: its network (eval mode, on the ensemble's device) and patch size."""

    fold: str
    checkpoint: Path
    trainer: str
    network: torch.nn.Module
    patch_size: list[int]


@dataclass
class Ensemble:
    """The folds of one experiment (they share plans); probabilities are averaged over them."""

    plans: dict
    configuration: str
    models: list[FoldModel]
    device: torch.device

    @property
    def folds(self) -> list[str]:
        return [m.fold for m in self.models]

    @property
    def in_channels(self) -> int:
        return int(self.plans["in_channels"])


def find_experiment_dir(name: str | None = None, plans_root: Path | None = None) -> Path:
    """``results/<experiment>``: the named one, else the single planned experiment (or, where no
    experiment is planned on this machine, the single one with results)."""
    from ..training.run import find_experiment

    results = paths.results_root()
    trained = sorted(p.name for p in results.iterdir() if p.is_dir()) if results.is_dir() else []
    if name is None:
        try:
            name = find_experiment(plans_root or paths.plans_root(), None)
        except InputError:
            if len(trained) != 1:
                raise
            name = trained[0]
    folder = results / name
    if not folder.is_dir():
        raise input_error(folder, f"experiment {name!r} has no trained models (experiments with results: "
                                  f"{', '.join(trained) or 'none'})",
                          "train it with versemi_train, choose another with -e, or point $VERSEMI_RESULTS at "
                          "the results folder")
    return folder


def checkpoint_paths(experiment_dir: Path, folds: Iterable[str] | None = None, trainer: str = "VerSemiTrainer",
                     configuration: str = "3d_fullres", checkpoint: str = "final") -> list[Path]:
    """``<experiment>/<trainer>__<configuration>/fold_<f>/checkpoint_<checkpoint>.pth`` per fold.

    ``folds`` None: every fold folder present (``fold_all`` only where no numbered fold exists).
    """
    from ..training.run import parse_fold

    if checkpoint not in CHECKPOINT_KINDS:
        raise input_error(f"--checkpoint {checkpoint}", "unknown checkpoint",
                          f"use one of {', '.join(CHECKPOINT_KINDS)}")
    experiment_dir = Path(experiment_dir)
    model_dir = experiment_dir / f"{trainer}__{configuration}"
    if not model_dir.is_dir():
        present = sorted(p.name for p in experiment_dir.iterdir() if p.is_dir() and "__" in p.name) \
            if experiment_dir.is_dir() else []
        raise input_error(model_dir, f"no {trainer} model of configuration {configuration!r} was trained here "
                                     f"(trained: {', '.join(present) or 'none'})",
                          f"train one (versemi_train {configuration} fold0 -tr {trainer}), or choose -tr / -e")
    trained = [f for f in FOLD_ORDER if (model_dir / f"fold_{f}").is_dir()]
    if folds is None:
        folds = [f for f in trained if f != "all"] or trained
        if not folds:
            raise input_error(model_dir, "holds no fold_* folder", f"train a fold first (versemi_train {configuration} "
                                                                  f"fold0 -tr {trainer})")
    wanted = list(dict.fromkeys(parse_fold(str(f)) for f in folds))
    found, problems = [], []
    for fold in wanted:
        folder = model_dir / f"fold_{fold}"
        path = folder / f"checkpoint_{checkpoint}.pth"
        if not folder.is_dir():
            problems.append(Problem(str(folder), f"fold {fold} was never trained (trained folds: "
                                                 f"{', '.join(trained) or 'none'})",
                                    f"train it (versemi_train {configuration} {fold} -tr {trainer}), or choose "
                                    "trained folds with -f"))
        elif not path.is_file():
            present = sorted(p.name for p in folder.glob("checkpoint_*.pth"))
            problems.append(Problem(str(path), f"missing (present: {', '.join(present) or 'no checkpoint'}); the "
                                               "fold's training has not finished",
                                    f"finish it (versemi_train {configuration} {fold} -tr {trainer} --continue), or "
                                    "choose another --checkpoint"))
        else:
            found.append(path)
    if problems:
        raise InputError(problems)
    return found


def load_models(experiment_dir_or_checkpoints: str | Path | Sequence[str | Path], folds: Iterable[str] | None = None,
                trainer: str = "VerSemiTrainer", configuration: str = "3d_fullres", checkpoint: str = "final",
                device: str | torch.device = "cpu") -> Ensemble:
    """The trained folds of an experiment folder (``results/<experiment>``), or the given checkpoint
    files, each network rebuilt exactly as its training built it, in eval mode on ``device``.

    All checkpoints must hold the same plans (one experiment) and configuration. ``folds``,
    ``trainer``, ``configuration`` and ``checkpoint`` choose the files in an experiment folder
    (``folds`` None: every fold folder present); given checkpoint files are used as they are.
    """
    device = torch.device(device)
    source = experiment_dir_or_checkpoints
    if isinstance(source, (str, Path)):
        source = Path(source)
        if source.is_dir():
            files = checkpoint_paths(source, folds, trainer, configuration, checkpoint)
        elif source.exists():
            files = [source]
        else:
            raise input_error(source, "does not exist", "give an experiment folder results/<experiment> or "
                                                        "checkpoint files")
    else:
        files = [Path(p) for p in source]
        if not files:
            raise ValueError("load_models needs at least one checkpoint")
    from ..training.checkpoint import load_checkpoint

    models, plans, first, configuration_name = [], None, None, None
    for path in files:
        state = load_checkpoint(path, "cpu")
        model = _fold_model(state, path, device)
        if plans is None:
            plans, first, configuration_name = state["plans"], path, state["configuration"]
        elif _canonical(state["plans"]) != _canonical(plans):
            raise input_error(path, f"holds other plans than {first} (experiment {state['plans'].get('experiment')!r} "
                                    f"vs {plans.get('experiment')!r}, or planned again since)",
                              "ensemble only folds trained on the same plans of one experiment")
        elif state["configuration"] != configuration_name:
            raise input_error(path, f"configuration {state['configuration']!r} differs from {configuration_name!r} "
                                    f"of {first}", "ensemble folds of one configuration")
        models.append(model)
        del state
    return Ensemble(plans, configuration_name, models, device)


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _fold_model(state, path: Path, device: torch.device) -> FoldModel:
    from ..nets import build_network
    from ..training.config import TrainingConfig
    from ..training.trainers import find_trainer

    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise input_error(path, f"is not a versemi training checkpoint (lacks {', '.join(missing)})",
                          "use a checkpoint_*.pth written by versemi_train")
    try:
        config = TrainingConfig.from_dict(state["config"])
        plans = state["plans"]
        if state.get("network_plan"):  # the network as trained, stored in the checkpoint
            network = build_network(state["network_plan"], plans["in_channels"], plans["num_prompts"])
            patch_size = list(config.patch_size or PlansView(plans).configuration(state["configuration"])["patch_size"])
        else:
            # checkpoints of older versions, and methods with their own build_network: the trainer
            # builds it (building a trainer only reads the plans, it writes nothing)
            trainer = find_trainer(state["trainer"])(plans, path.parent, state["configuration"], str(state["fold"]),
                                                     path.parent, config, "cpu")
            network, patch_size = trainer.build_network(), list(trainer.patch_size)
        network.load_state_dict(state["network"])
    except (TypeError, KeyError, ValueError, RuntimeError) as exc:
        raise input_error(path, f"the network cannot be rebuilt from the checkpoint ({type(exc).__name__}: "
                                f"{str(exc)[:200]})",
                          "use a checkpoint written by this version of versemi_train, or train again") from exc
    network.to(device).eval()
    return FoldModel(str(state["fold"]), Path(path), state["trainer"], network, patch_size)


# ----- prompts -----
def prompt_table(plans: dict) -> str:
    """The experiment's prompts as ``-p`` accepts them."""
    real = PlansView(plans).real_prompts
    entries = []
    for p in real:
        single = sum(q["dataset"] == p["dataset"] for q in real) == 1
        entries.append(f"{p['dataset']}:{p['label']}" + (f" (or {p['dataset']})" if single else ""))
    return ", ".join(entries)


def _match_dataset(names: list[str], text: str) -> str | None:
    for candidate in names:
        if candidate == text:
            return candidate
    for candidate in names:
        if candidate.lower() == text.lower():
            return candidate
    for candidate in names:  # nnU-Net's Dataset001_LA answers to LA and 1
        m = NNUNET_DATASET.match(candidate)
        if m and (m.group(2).lower() == text.lower() or (text.isdigit() and int(text) == int(m.group(1)))):
            return candidate
    return None


def resolve_prompt(plans: dict, text: str) -> dict:
    """The prompt entry of plans.json named by ``DATASET``, ``DATASET:LABEL`` or ``DATASET/LABEL``
    (LABEL: the label's name or value); InputError listing the prompt table otherwise."""
    real = PlansView(plans).real_prompts
    dataset_text, _, label_text = re.split(r"([:/])", text, maxsplit=1) if re.search(r"[:/]", text) else (text, "", "")
    dataset = _match_dataset(list(dict.fromkeys(p["dataset"] for p in real)), dataset_text.strip())
    unknown = input_error(f"-p {text}", f"unknown prompt (prompts of experiment {plans.get('experiment')!r}: "
                                        f"{prompt_table(plans)})",
                          "name a dataset, or DATASET:LABEL for a dataset with several labels")
    if dataset is None:
        raise unknown
    candidates = [p for p in real if p["dataset"] == dataset]
    label_text = label_text.strip()
    if not label_text:
        if len(candidates) == 1:
            return candidates[0]
        raise input_error(f"-p {text}", f"dataset {dataset} has {len(candidates)} labels (prompts: "
                                        f"{prompt_table(plans)})",
                          f"name one, e.g. -p {dataset}:{candidates[0]['label']}")
    for p in candidates:
        if p["label"] == label_text or p["label"].lower() == label_text.lower() or \
                (label_text.isdigit() and int(label_text) == p["label_value"]):
            return p
    raise unknown


def resolve_prompts(plans: dict, texts: Sequence[str] | None) -> list[dict]:
    """The prompts named by ``texts`` (each as ``resolve_prompt``; ``all``: every real prompt),
    in the experiment's prompt order, without repeats. None: ``all``."""
    real = PlansView(plans).real_prompts
    if not texts or any(t.strip().lower() == "all" for t in texts):
        return real
    chosen = {resolve_prompt(plans, t)["index"] for t in texts}
    return [p for p in real if p["index"] in chosen]


# ----- input cases -----
@dataclass(frozen=True)
class InputCase:
    """One case to predict: its channel files in order and their file ending."""

    case_id: str
    files: tuple[Path, ...]
    ending: str

    def output_path(self, folder: Path) -> Path:
        return Path(folder) / f"{self.case_id}{self.ending}"

    def probabilities_path(self, folder: Path) -> Path:
        return Path(folder) / f"{self.case_id}_prob.npz"


def _discover(inputs: Sequence[Path], in_channels: int) -> tuple[list[InputCase], list[Problem]]:
    problems: list[Problem] = []
    entries: dict[str, dict] = {}

    def add(case: str, channel: int, path: Path, ending: str) -> None:
        entry = entries.setdefault(case, {"ending": ending, "channels": {}})
        if entry["ending"] != ending:
            problems.append(Problem(str(path), f"case {case!r} is also given as a {entry['ending']} file",
                                    "give each case once, all channels in one format"))
        elif channel in entry["channels"] and entry["channels"][channel].resolve() != path.resolve():
            problems.append(Problem(str(path), f"case {case!r} channel {channel} is also given as "
                                               f"{entry['channels'][channel]}", "give each case once"))
        else:
            entry["channels"][channel] = path

    for item in map(Path, inputs):
        if item.is_dir():
            found = 0
            for child in sorted(item.iterdir()):
                ending = file_ending(child)
                if child.name.startswith(".") or not ending or not child.is_file():
                    continue  # hidden (e.g. partial writes) and non-image files
                m = CHANNEL_NAME.match(child.name[:-len(ending)])
                if m is None:
                    problems.append(Problem(str(child), f"is not named CASE_XXXX{ending} (one file per channel: "
                                                        "_0000, _0001, ...)",
                                            f"rename it, e.g. to {child.name[:-len(ending)]}_0000{ending}, or pass "
                                            "it with -i on its own"))
                    continue
                add(m["case"], int(m["channel"]), child, ending)
                found += 1
            if not found and not any(p.file.startswith(str(item)) for p in problems):
                problems.append(Problem(str(item), "holds no images named CASE_0000<ending> "
                                                   f"({', '.join(SUPPORTED_ENDINGS)})",
                                        "point -i at the folder of images, or at the image files"))
        elif item.is_file():
            ending = file_ending(item)
            if not ending:
                problems.append(Problem(str(item), "unsupported file ending",
                                        f"use one of {', '.join(SUPPORTED_ENDINGS)}"))
                continue
            stem = item.name[:-len(ending)]
            m = CHANNEL_NAME.match(stem)
            if m:
                add(m["case"], int(m["channel"]), item, ending)
            else:  # a single-channel image without the _0000 suffix: the case is its name
                add(stem, 0, item, ending)
        else:
            problems.append(Problem(str(item), "does not exist", "check the path given with -i"))

    cases = []
    expected = list(range(in_channels))
    for case_id in sorted(entries):
        entry = entries[case_id]
        channels = entry["channels"]
        files = [channels[c] for c in sorted(channels)]
        if sorted(channels) != expected:
            names = ", ".join(f.name for f in files)
            want = ", ".join(f"{case_id}_{c:04d}{entry['ending']}" for c in expected)
            problems.append(Problem(str(files[0]), f"case {case_id!r} has {len(files)} channel file(s) ({names}) but "
                                                   f"the model takes {in_channels} channel(s)",
                                    f"give exactly the files {want}"))
            continue
        cases.append(InputCase(case_id, tuple(files), entry["ending"]))
    return cases, problems


def find_cases(inputs: Sequence[str | Path], in_channels: int) -> list[InputCase]:
    """Cases of the input folders (``CASE_0000.ext`` files grouped by case) and files; InputError
    listing every problem (wrong channel count, unknown files) at once."""
    cases, problems = _discover([Path(p) for p in inputs], in_channels)
    if problems:
        raise InputError(problems)
    return cases


def _header_problems(case: InputCase) -> list[Problem]:
    """Unreadable or non-3D channel files, and channels of different size, from the headers only."""
    problems, size = [], None
    for path in case.files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            lines = str(exc).strip().splitlines()
            problems.append(Problem(str(path), f"cannot be read as an image ({(lines[-1] if lines else '')[:200]})",
                                    "replace it with an intact copy"))
            continue
        if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
            problems.append(Problem(str(path), f"is not a single-channel 3D image (dimension {reader.GetDimension()}, "
                                               f"{reader.GetNumberOfComponents()} components per voxel)",
                                    "store each channel as its own 3D file CASE_0000, CASE_0001, ..."))
        elif size is None:
            size = reader.GetSize()
        elif reader.GetSize() != size:
            problems.append(Problem(str(path), f"size {reader.GetSize()} differs from the case's first channel {size}",
                                    "resample all channels of a case onto the same voxel grid"))
    return problems


def _output_problems(cases: list[InputCase], inputs: Sequence[Path], output_folder: Path, save_probabilities: bool,
                     overwrite: bool) -> list[Problem]:
    out = output_folder.resolve()
    if out.exists() and not out.is_dir():
        return [Problem(str(output_folder), "exists and is not a folder", "choose a folder for -o")]
    input_files = {f.resolve() for c in cases for f in c.files}
    input_folders = {p.resolve() for p in inputs if p.is_dir()} | {f.parent for f in input_files}
    if out in input_folders:
        return [Problem(str(output_folder), "is the input folder: predictions would be written among (and could "
                                            "overwrite) the input images", "write the predictions to another folder")]
    targets = [c.output_path(out) for c in cases]
    if save_probabilities:
        targets += [c.probabilities_path(out) for c in cases]
    clashes = [t for t in targets if t in input_files]
    if clashes:
        return [Problem(str(clashes[0]), "would overwrite an input image", "write the predictions to another folder")]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        names = ", ".join(t.name for t in existing[:5])
        names += f" and {len(existing) - 5} more" if len(existing) > 5 else ""
        return [Problem(str(output_folder), f"{len(existing)} output file(s) exist already ({names})",
                        "pass --overwrite to replace them, or choose another output folder")]
    return []


# ----- prediction -----
def mirror_axes(mirroring: bool) -> list[tuple[int, ...]]:
    """Flip combinations of the spatial axes (2, 3, 4) of a (B, C, Z, Y, X) batch: 8 with mirroring, else none."""
    if not mirroring:
        return [()]
    return [axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)]


def _is_oom(exc: Exception) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


@torch.no_grad()
def sliding_window_probabilities(network: torch.nn.Module, data: np.ndarray, prompt_index: int | Sequence[int],
                                 patch_size, device: torch.device, step: float = 0.5, mirroring: bool = True,
                                 batch_size: int = 2, *, overlap: float | Sequence[float] | None = None,
                                 blend: str = "gaussian") -> torch.Tensor:
    """Foreground probabilities (Z, Y, X) of one prompt, or (K, Z, Y, X) of a list of K prompts, on
    a preprocessed (C, Z, Y, X) image: Gaussian sliding window, windows ``step`` x patch apart
    (overlap 1 - step), each window averaged over the mirror flips. Every window goes through the
    backbone once for all the prompts. On CUDA the stitched output moves to the CPU if GPU memory
    runs out.

    ``overlap`` (a fraction of the window, one value or one per axis) replaces ``1 - step``;
    ``blend`` "constant" averages overlapping windows with equal weight instead of Gaussian weights."""
    if not 0 < step <= 1:
        raise ValueError(f"step must lie in (0, 1]; got {step}")
    if blend not in ("gaussian", "constant"):
        raise ValueError(f"blend must be 'gaussian' or 'constant'; got {blend!r}")
    overlap = 1.0 - step if overlap is None else (float(overlap) if np.isscalar(overlap) else [float(o) for o in overlap])
    device = torch.device(device)
    image = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None].to(device)
    single = np.isscalar(prompt_index)
    prompt = torch.tensor([[int(prompt_index)]] if single else [[int(p) for p in prompt_index]], device=device)
    flips = mirror_axes(mirroring)

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        prompts = prompt.expand(windows.shape[0], -1)
        total = None
        for axes in flips:
            x = torch.flip(windows, axes) if axes else windows
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                logits = network(x, prompts)  # (B, K, 2, Z, Y, X)
            p = torch.softmax(logits.float(), dim=2)[:, :, 1]
            p = torch.flip(p, axes) if axes else p
            total = p if total is None else total + p
        return total / len(flips)

    def run(output_device):
        stitched = sliding_window_inference(image, list(patch_size), sw_batch_size=batch_size, predictor=predictor,
                                            overlap=overlap, mode=blend, sw_device=device, device=output_device)[0]
        return stitched[0] if single else stitched

    if device.type != "cuda":
        return run(device)
    try:
        return run(device)
    except RuntimeError as exc:
        if not _is_oom(exc):
            raise
        torch.cuda.empty_cache()
        return run(torch.device("cpu"))


def ensemble_probabilities(ensemble: Ensemble, data: np.ndarray, prompt_index: int | Sequence[int], step: float = 0.5,
                           mirroring: bool = True, *, patch_size=None, overlap: float | Sequence[float] | None = None,
                           blend: str = "gaussian") -> torch.Tensor:
    """The mean over the ensemble's folds of ``sliding_window_probabilities`` (``patch_size`` None:
    each fold's own patch)."""
    total = None
    for model in ensemble.models:
        p = sliding_window_probabilities(model.network, data, prompt_index, patch_size or model.patch_size,
                                         ensemble.device, step, mirroring, overlap=overlap, blend=blend)
        total = p if total is None else total + p.to(total.device)
    return total / len(ensemble.models)


def resize_probabilities(probabilities: torch.Tensor, shape) -> np.ndarray:
    """Trilinear resampling of a (Z, Y, X) or (K, Z, Y, X) probability map to ``shape`` (float32 numpy)."""
    shape = tuple(int(s) for s in shape)
    channels = probabilities[None] if probabilities.dim() == 3 else probabilities
    if tuple(channels.shape[1:]) != shape:
        try:
            channels = F.interpolate(channels[None].float(), size=shape, mode="trilinear", align_corners=False)[0]
        except RuntimeError as exc:
            if channels.device.type != "cuda" or not _is_oom(exc):
                raise
            torch.cuda.empty_cache()
            channels = F.interpolate(channels.cpu()[None].float(), size=shape, mode="trilinear", align_corners=False)[0]
    channels = channels.float().cpu().numpy()
    return channels[0] if probabilities.dim() == 3 else channels


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
