"""Export prompts of a trained experiment as a MONAI bundle that runs without versemi.

    bundle = export_bundle("bundles/la_versemi", "LA", folds=["0", "1"])
    # python -m monai.bundle run --config_file bundles/la_versemi/configs/inference.json \
    #     --dataset_dir IN --output_dir OUT
    export_bundle("bundles/heart", ["Heart:atrium", "Heart:ventricle"])  # one label map

The bundle does what ``versemi_predict`` does for those prompts, with MONAI's transforms where they
compute the same thing: crop to the nonzero region (CropForegroundd), the dataset plan's
normalization (ScaleIntensityRanged / NormalizeIntensityd), resampling to the plan's spacing
(versemi's own algorithm, ``ResampleToSpacingd`` in the bundle's scripts: MONAI's Spacingd aligns
the grid differently), Gaussian sliding window (overlap 0.5) with the trained patch size, mirroring
over the 3 axes and the mean over the exported folds (both inside ``models/model.ts``), inversion
to the input's voxel grid (Invertd), and ``p > 0.5`` written in the input's geometry.

Several prompts give one bundle with one label map, as ``versemi_predict -p A B`` does
(``versemi.inference.label_map``): the model returns a background channel (the constant 0.5) and
one probability channel per prompt, every window going through each fold's backbone once for all
of them; ``LabelMapd`` (scripts/inference.py) gives each voxel the value of its most probable
prompt when that probability is > 0.5, and ``configs/labels.json`` (copied to the output folder)
is the table of values. The bundle has one preprocessing pipeline, so the prompts' datasets must
share normalization and target spacing. Layout::

    configs/metadata.json     the MONAI metadata (mandatory keys of the bundle spec, provenance)
    configs/inference.json    the inference workflow; every path hangs off ``bundle_root``
    configs/logging.conf
    configs/labels.json       several prompts only: the label map's values (versemi_predict's labels.json)
    models/model.ts           TorchScript: (B, C, X, Y, Z) -> (B, 2, X, Y, Z) probabilities, prompt
                              fixed, averaged over the 8 mirror flips and the exported folds
                              (K prompts: (B, K + 1, X, Y, Z))
    models/model.pt           the plain state dict of that module (``torch.load(weights_only=True)``):
                              ``networks.<i>.*`` is fold i's network (order in metadata ``versemi.folds``)
    models/checksums.json     SHA-256 of each model file, checked before the model loads
    scripts/inference.py      that check, the input scan, the resampling and the loop (no versemi)
    docs/README.md            model card;   LICENSE   Apache-2.0

The bundle is built in a hidden folder next to the target and renamed into place at the end, so
a failed export leaves nothing half-written. Exporting the same checkpoints again writes
byte-identical ``configs/``, ``docs/`` and ``models/model.pt``; ``model.ts`` is identical when
exported by a fresh process (TorchScript numbers its compiled classes per process).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from .. import __version__ as versemi_version
from .. import paths
from ..atomic import current_umask, disk_space_checked
from ..errors import InputError, Problem, input_error
from ..inference.label_map import OVERLAP_RULE, THRESHOLD, LabelTable, label_table
from ..inference.predictor import Ensemble, load_models, mirror_axes, resolve_prompts
from ..locks import run_lock
from ..model.layout import find_experiment_dir
from ..model.plans_view import PlansView

BUNDLE_VERSION = "0.1.0"
# the JSON schema of metadata.json the MONAI model zoo validates against (monai.bundle verify_metadata)
METADATA_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                   "meta_schema_20240725.json")
# packages the bundle needs beyond MONAI, torch and numpy (reading NIfTI, spline resampling, the CLI)
REQUIRED_PACKAGES = ("nibabel", "scipy", "fire", "pyyaml")
TEMPLATES = Path(__file__).resolve().parent / "templates"
SW_BATCH_SIZE = 2  # windows per network call, as versemi_predict
LABELS = "configs/labels.json"  # several prompts: the label map's values (LabelTable.to_json)
# the precision the traced model computes in, on every machine; fp32 is portable, bf16 only pays on
# CPUs with bf16 units (and GPUs): elsewhere it is emulated and far slower
BUNDLE_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def _logits(network: nn.Module, x: torch.Tensor, prompts: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The network's logits under the autocast ``versemi_predict --precision`` uses; a trace
    records the casts, so the traced model computes in ``dtype`` wherever it runs."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        return network.prompt_head(network.features(x), prompts)[0]


class BundleNetwork(nn.Module):
    """The exported model: one prompt's foreground probabilities, averaged over mirror flips and folds.

    Takes MONAI's ``(B, C, X, Y, Z)`` arrays (the networks were trained on ``(B, C, Z, Y, X)``) and
    returns ``(B, 2, X, Y, Z)`` probabilities (background, target), as ``versemi_predict`` computes
    them per sliding window: softmax per flip, flipped back, mean over the 8 flips and the folds.
    """

    def __init__(self, networks: Sequence[nn.Module], prompt_index: int, mirroring: bool = True,
                 precision: str = "fp32", patch_size: Sequence[int] | None = None) -> None:
        super().__init__()
        self.networks = nn.ModuleList(networks)
        self.prompt_index = int(prompt_index)
        self.flips = mirror_axes(mirroring, patch_size)  # a 2d model is never flipped across slices
        self.dtype = BUNDLE_PRECISIONS[precision]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 1, 4, 3, 2)  # (B, C, X, Y, Z) -> (B, C, Z, Y, X)
        # (B, 1) prompt matrix built from x: a traced graph then keeps the batch size and the device
        # dynamic (PromptedSegmenter.head would move the prompts to the trace's device, baked in)
        prompts = torch.zeros_like(x[:, :1, 0, 0, 0], dtype=torch.long) + self.prompt_index
        total, count = None, 0
        for network in self.networks:
            for axes in self.flips:
                flipped = torch.flip(x, axes) if axes else x
                logits = _logits(network, flipped, prompts, self.dtype)[:, 0]  # (B, 2, Z, Y, X)
                p = torch.softmax(logits.float(), dim=1)
                p = torch.flip(p, axes) if axes else p
                total = p if total is None else total + p
                count += 1
        return (total / count).permute(0, 1, 4, 3, 2)


class LabelMapNetwork(nn.Module):
    """The exported model of K prompts: channel 0 background, channel k prompt k's probability.

    Takes ``(B, C, X, Y, Z)`` and returns ``(B, K + 1, X, Y, Z)``. Channel k (1..K) is the
    foreground probability of the k-th prompt as ``versemi_predict`` computes it (softmax per
    flip, flipped back, mean over the 8 flips and the folds); each window goes through each
    fold's backbone once for all K prompts. Channel 0 is the constant 0.5, so the argmax over the
    channels is the label-map rule: a prompt wins only with a probability > 0.5 (at exactly 0.5
    the first maximum, background, wins), and among those the most probable (ties: the first
    prompt, as numpy's argmax in versemi). ``1 - max p`` would not do: it is not linear, so
    averaging it over overlapping windows is not ``1 - max`` of the averaged probabilities.
    """

    def __init__(self, networks: Sequence[nn.Module], prompt_indices: Sequence[int], mirroring: bool = True,
                 precision: str = "fp32", patch_size: Sequence[int] | None = None) -> None:
        super().__init__()
        self.networks = nn.ModuleList(networks)
        self.prompt_indices = [int(i) for i in prompt_indices]
        self.flips = mirror_axes(mirroring, patch_size)  # a 2d model is never flipped across slices
        self.dtype = BUNDLE_PRECISIONS[precision]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 1, 4, 3, 2)  # (B, C, X, Y, Z) -> (B, C, Z, Y, X)
        # (B, K) prompt matrix built from x, so the trace keeps batch size and device dynamic
        base = torch.zeros_like(x[:, :1, 0, 0, 0], dtype=torch.long)
        prompts = torch.cat([base + i for i in self.prompt_indices], dim=1)
        total, count = None, 0
        for network in self.networks:
            for axes in self.flips:
                flipped = torch.flip(x, axes) if axes else x
                logits = _logits(network, flipped, prompts, self.dtype)  # (B, K, 2, Z, Y, X)
                p = torch.softmax(logits.float(), dim=2)[:, :, 1]
                p = torch.flip(p, axes) if axes else p
                total = p if total is None else total + p
                count += 1
        p = total / count
        background = torch.zeros_like(p[:, :1]) + THRESHOLD
        return torch.cat([background, p], dim=1).permute(0, 1, 4, 3, 2)


# ----- the bundle's parts -----
def trace_network(module: nn.Module, in_channels: int, divisor: Sequence[int],
                  one_slice: bool = False) -> torch.jit.ScriptModule:
    """TorchScript of ``module`` (eval mode), traced on a small input and checked on another size.

    The trace runs on twice the network's divisor per axis (cheap even for large networks; the
    graph holds no sizes) and is compared with the eager module on three times the divisor.
    ``one_slice``: a 2d model, which takes windows one slice thick.
    """
    module = module.eval()

    def size_xyz(times: int) -> list[int]:
        return [1 if one_slice and axis == 0 else times * d for axis, d in enumerate(divisor)][::-1]

    example = torch.zeros(1, in_channels, *size_xyz(2))
    with warnings.catch_warnings():
        # trace-time checks of the network (input size, prompt range) become constants: intended
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        with torch.no_grad():
            traced = torch.jit.trace(module, example, check_trace=False, _store_inputs=False)
    check = torch.Generator().manual_seed(0)
    probe = torch.rand(2, in_channels, *size_xyz(3), generator=check)
    with torch.no_grad():
        difference = (traced(probe) - module(probe)).abs().max().item()
    if difference > 1e-4:
        raise RuntimeError(f"the traced network differs from the eager one by {difference:.2e} on another input "
                           "size; this network cannot be exported as TorchScript")
    return traced


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in REQUIRED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _modality(channel_name: str) -> str:
    name = channel_name.strip().upper()
    if name == "CT":
        return "CT"
    if name in ("MR", "MRI", "T1", "T1W", "T1C", "T1GD", "T2", "T2W", "FLAIR", "ADC", "DWI", "PD"):
        return "MR"
    return channel_name


def normalization_transforms(channel_plans: list[dict]) -> list[dict]:
    """MONAI transforms that normalize like ``versemi.preprocessing.normalization.normalize``.

    CT: clip to the plan's range, then ``(x - mean) / std`` (one ScaleIntensityRanged: a linear map
    with clipping is the same thing); z-score: per image, inside the nonzero mask where planned.
    """
    if len(channel_plans) != 1:
        raise input_error("plans.json in_channels", f"the experiment has {len(channel_plans)} input channels; bundle "
                                                   "export supports single-channel experiments only",
                          "predict multi-channel images with versemi_predict")
    plan = channel_plans[0]
    if plan["scheme"] == "ct":
        low, high = (float(v) for v in plan["clip"])
        mean, std = float(plan["mean"]), max(float(plan["std"]), 1e-8)
        return [{"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": low, "a_max": high,
                 "b_min": (low - mean) / std, "b_max": (high - mean) / std, "clip": True}]
    if plan["scheme"] == "zscore":
        return [{"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": bool(plan.get("use_nonzero_mask")),
                 "channel_wise": True}]
    raise ValueError(f"unknown normalization scheme {plan['scheme']!r}")


def spacing_transform(target_spacing_zyx: Sequence[float]) -> str:
    """The bundle's resampling to the plan's spacing (``ResampleToSpacingd`` of scripts/inference.py).

    It is versemi's own algorithm (edge-aligned third-order splines, an anisotropic axis apart
    with nearest neighbour), invertible for Invertd. MONAI's Spacingd keeps the exact target
    spacing and so places the grid up to half a voxel differently (measured: Dice 0.93 against
    versemi_predict on a resampled demo image, 1.0 with this transform). MONAI's spatial axes are
    (x, y, z): the plan's (z, y, x) spacing is reversed. ``None`` keeps the image's own spacing
    along that axis (a 2d model's slice axis).
    """
    pixdim = [None if s is None else float(s) for s in reversed(target_spacing_zyx)]
    return f"$@code['ResampleToSpacingd'](keys='image', pixdim={pixdim})"


# The bundle folder is the parent of the folder of the config file given on the command line
# (``--config_file X`` or ``--config_file=X``), so the bundle runs from any working directory;
# elsewhere (the Python API) the current folder, or ``--bundle_root`` / ``bundle_root=`` when given.
BUNDLE_ROOT = ("$next((os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[i + 1] if a == '--config_file' "
               "else a.split('=', 1)[1]))) for i, a in enumerate(sys.argv) if (a == '--config_file' and "
               "i + 1 < len(sys.argv)) or a.startswith('--config_file=')), os.getcwd())")
# ``CASE_0000.nii.gz`` -> ``CASE.nii.gz`` as versemi_predict names its outputs
OUTPUT_NAME = ("$lambda meta, saver: {'subject': re.sub('_0000(?=[.]nii([.]gz)?$)', '', "
               "str(meta['filename_or_obj'])), 'idx': None}")


def discretize_transforms(values: Sequence[int] | None) -> list:
    """Probabilities -> labels. One prompt: argmax of (1 - p, p), i.e. p > 0.5, versemi_predict's
    threshold. Several: the label map by ``compose``'s rule (``LabelMapd`` of scripts/inference.py)."""
    if values is None:
        return [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]
    return [f"$@code['LabelMapd'](keys='pred', values={[int(v) for v in values]}, threshold={THRESHOLD})"]


def save_transform(values: Sequence[int] | None) -> dict:
    """SaveImaged as ``CASE.nii.gz`` in the input's geometry; uint8, or uint16 for a value above 255
    (as versemi_predict)."""
    dtype = "$numpy.uint16" if values is not None and max(values) > 255 else "$numpy.uint8"
    return {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "",
            "writer": "NibabelWriter", "output_ext": ".nii.gz", "output_dtype": dtype, "resample": False,
            "separate_folder": False, "squeeze_end_dims": True, "print_log": False,
            "output_name_formatter": OUTPUT_NAME}


def inference_config(in_channels: int, patch_size_zyx: Sequence[int], target_spacing_zyx: Sequence[float],
                     channel_plans: list[dict], values: Sequence[int] | None = None) -> dict:
    """configs/inference.json: the versemi_predict pipeline in MONAI's (x, y, z) axis order.

    ``values``: the label table's values of several prompts (None: one prompt, a 0/1 mask)."""
    preprocessing = [
        # pinned readers/writers: the same result whether or not ITK is installed
        {"_target_": "LoadImaged", "keys": "image", "image_only": True, "reader": "NibabelReader"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        # nonzero in any channel, like versemi's nonzero_bbox; an all-zero image keeps its extent
        {"_target_": "CropForegroundd", "keys": "image", "source_key": "image",
         "select_fn": "$lambda x: (x != 0) | ~(x != 0).any()", "margin": 0, "allow_smaller": True},
        *normalization_transforms(channel_plans),
        spacing_transform(target_spacing_zyx),
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
    ]
    postprocessing = [
        # back to the input's voxel grid: trilinear resize of the probabilities, then the crop undone
        # (zeros outside it)
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True},
        *discretize_transforms(values),
        save_transform(values),
    ]
    run = ["$@code['predict'](@dataloader, @inferer, @network, @postprocessing, @device)"]
    if values is not None:  # OUT/labels.json next to the label maps, as versemi_predict writes it
        run.append(f"$@code['copy_label_table'](@bundle_root, '{LABELS}', @output_dir)")
    return {
        "imports": ["$import os", "$import re", "$import runpy", "$import sys"],
        "bundle_root": BUNDLE_ROOT,
        "dataset_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        # 0: transforms built from config lambdas and scripts/ do not pickle into spawned workers
        "num_workers": 0,
        "in_channels": in_channels,
        # the bundle's helpers (scripts/inference.py), loaded by path: no sys.path or working-directory games
        "code": "$runpy.run_path(os.path.join(@bundle_root, 'scripts', 'inference.py'))",
        "datalist": "$@code['find_images'](@dataset_dir, @in_channels)",
        # checks models/checksums.json first; map_location: a GPU-exported bundle loads on a CPU-only machine
        "network_def": "$@code['load_torchscript'](@bundle_root, 'models/model.ts', @device)",
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": "@num_workers"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [int(s) for s in reversed(patch_size_zyx)],
                    "sw_batch_size": SW_BATCH_SIZE, "overlap": 0.5, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
        # a plain loop rather than SupervisedEvaluator, which needs pytorch-ignite
        "run": run,
    }


def cross_validation_dice(ensemble: Ensemble, prompt_key: str) -> dict[str, float | None]:
    """Each exported fold's validation Dice of the prompt (``validation/summary.json``; None if absent)."""
    scores = {}
    for model in ensemble.models:
        summary = model.checkpoint.parent / "validation" / "summary.json"
        value = None
        if summary.is_file():
            try:
                value = json.loads(summary.read_text(encoding="utf-8")).get("mean_dice", {}).get(prompt_key)
            except (OSError, ValueError):
                value = None
        scores[model.fold] = None if value is None else float(value)
    return scores


def metadata(ensemble: Ensemble, prompt: dict, patch_size_zyx: Sequence[int], dice: dict[str, float | None],
             version: str, authors: str, copyright_: str) -> dict:
    """configs/metadata.json: the bundle spec's mandatory keys, the network's I/O, and provenance."""
    import monai
    import numpy

    plans = ensemble.plans
    dataset, label = prompt["dataset"], prompt["label"]
    view = PlansView(plans)
    plan = view.dataset_plan(dataset, ensemble.configuration)
    declared = {d: view.known_absent(d) for d in view.dataset_names if view.known_absent(d)}
    channels = plan["channel_names"]
    patch_xyz = [int(s) for s in reversed(patch_size_zyx)]
    norm = plan["normalization"][0]
    if norm["scheme"] == "ct":
        std = max(float(norm["std"]), 1e-8)
        value_range = [(float(norm["clip"][0]) - float(norm["mean"])) / std,
                       (float(norm["clip"][1]) - float(norm["mean"])) / std]
    else:
        value_range = []  # z-scored per image: unbounded
    defined = [v for v in dice.values() if v is not None]
    eval_metrics = {"mean_dice": sum(defined) / len(defined)} if defined else {}
    eval_metrics.update({f"fold_{f}_dice": v for f, v in dice.items() if v is not None})
    labeled = {d: len(p.get("labeled_cases", [])) for d, p in plans["datasets"].items()}
    unlabeled = {d: len(p.get("unlabeled_cases", [])) for d, p in plans["datasets"].items()}
    config = ensemble.models[0]
    return {
        "schema": METADATA_SCHEMA,
        "version": version,
        "changelog": {version: f"exported by versemi {versemi_version} from experiment {plans['experiment']} "
                               f"({config.trainer}, folds {', '.join(ensemble.folds)})"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": _package_versions(),
        "supported_apps": {},
        "name": f"VerSemi {dataset} {label} segmentation",
        "task": f"Segmentation of {label} in {', '.join(channels)} images ({dataset})",
        "description": (f"Prompt {dataset}/{label} of a VerSemi model ({config.trainer}) trained jointly on "
                        f"{', '.join(plans['dataset_names'])} with task prompts; {len(ensemble.models)} fold(s) "
                        "ensembled, test-time mirroring, nnU-Net-style preprocessing and Gaussian sliding window."),
        "authors": authors,
        "copyright": copyright_,
        "data_source": f"versemi experiment {plans['experiment']}: " + "; ".join(
            f"{d}: {labeled[d]} labeled, {unlabeled[d]} unlabeled case(s)" for d in plans["dataset_names"]),
        "data_type": "nibabel",
        "image_classes": f"{len(channels)} channel(s): {', '.join(channels)}; any orientation and spacing "
                         f"(resampled internally to {list(reversed(plan['target_spacing']))} mm, x y z)",
        "label_classes": f"0: background, 1: {label}",
        "pred_classes": f"0: background, 1: {label}",
        "eval_metrics": eval_metrics,
        "intended_use": "Research and clinical pilot studies only; not a medical device and not for diagnosis.",
        "references": [
            "Zeng et al. Segment Together: A Versatile Paradigm for Semi-Supervised Medical Image "
            "Segmentation. IEEE Transactions on Medical Imaging, 2025. arXiv:2311.11686",
            "Isensee et al. nnU-Net: a self-configuring method for deep learning-based biomedical image "
            "segmentation. Nature Methods 18, 203-211 (2021)",
        ],
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": _modality(channels[0]),
                "num_channels": len(channels), "spatial_shape": patch_xyz, "dtype": "float32",
                "value_range": value_range, "is_patch_data": True,
                "channel_def": {str(i): name for i, name in enumerate(channels)}}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": 2, "spatial_shape": patch_xyz,
                "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                "channel_def": {"0": "background", "1": label}}},
        },
        "versemi": {
            "versemi_version": versemi_version,
            "experiment": plans["experiment"],
            "trainer": config.trainer,
            "configuration": ensemble.configuration,
            "folds": ensemble.folds,
            "prompt": {k: prompt[k] for k in ("index", "dataset", "label", "label_value")},
            "patch_size_zyx": list(patch_size_zyx),
            "precision": ensemble.precision,
            "target_spacing_zyx": plan["target_spacing"],
            "normalization": plan["normalization"],
            "axis_order": "MONAI arrays and spatial_shape are (x, y, z); versemi's plans are (z, y, x)",
            "model_pt": "state dict of models/model.ts's module: networks.<i>.* is fold folds[i]'s network "
                        "(versemi.nets.build_network with the plan's network)",
            # structures learnt absent from a dataset's images; the bundle still predicts them everywhere
            **({"known_absent": declared} if declared else {}),
        },
    }


def label_map_metadata(ensemble: Ensemble, table: LabelTable, patch_size_zyx: Sequence[int],
                       dice: dict[str, dict[str, float | None]], version: str, authors: str, copyright_: str) -> dict:
    """configs/metadata.json of several prompts: the one-prompt metadata, with the label map's
    classes, K + 1 output channels, each prompt's Dice (``dice``: prompt name -> fold -> Dice) and
    the label table."""
    prompts = list(table.prompts)
    meta = metadata(ensemble, prompts[0], patch_size_zyx, {}, version, authors, copyright_)
    plans, names = ensemble.plans, [_prompt_name(p) for p in prompts]
    datasets = list(dict.fromkeys(p["dataset"] for p in prompts))
    channels = PlansView(plans).dataset_plan(datasets[0])["channel_names"]
    classes = ", ".join(["0: background", *(f"{v}: {n}" for v, n in zip(table.values, names))])
    meta.update({
        "name": f"VerSemi {' + '.join(datasets)} label map",
        "task": f"Segmentation of {', '.join(names)} in {', '.join(channels)} images into one label map",
        "description": (f"Prompts {', '.join(names)} of a VerSemi model ({ensemble.models[0].trainer}) trained "
                        f"jointly on {', '.join(plans['dataset_names'])} with task prompts, in one label map "
                        f"(overlaps: the most probable prompt); {len(ensemble.models)} fold(s) ensembled, "
                        "test-time mirroring, nnU-Net-style preprocessing and Gaussian sliding window."),
        "label_classes": classes,
        "pred_classes": classes,
        "eval_metrics": _label_map_metrics(dice),
    })
    meta["network_data_format"]["outputs"]["pred"].update(
        num_channels=len(prompts) + 1, channel_def={"0": "background", **{str(k + 1): n for k, n in enumerate(names)}})
    versemi = meta["versemi"]
    del versemi["prompt"]
    versemi["prompts"] = [{k: p[k] for k in ("index", "dataset", "label", "label_value")} for p in prompts]
    versemi["label_table"] = table.to_json()
    versemi["output_channels"] = ("0: background, the constant 0.5; k: the k-th prompt's probability; the argmax "
                                  "over channels is the label map's rule (the most probable prompt above 0.5)")
    return meta


def _prompt_name(prompt: dict) -> str:
    return f"{prompt['dataset']}/{prompt['label']}"


def _label_map_metrics(dice: dict[str, dict[str, float | None]]) -> dict[str, float]:
    """The mean Dice over every prompt and fold, then per prompt its mean and each fold's."""
    defined = [v for scores in dice.values() for v in scores.values() if v is not None]
    metrics = {"mean_dice": sum(defined) / len(defined)} if defined else {}
    for name, scores in dice.items():
        values = [v for v in scores.values() if v is not None]
        if values:
            metrics[f"{name}_mean_dice"] = sum(values) / len(values)
        metrics.update({f"{name}_fold_{f}_dice": v for f, v in scores.items() if v is not None})
    return metrics


def model_card(meta: dict, dice: dict[str, float | None], plans: dict, prompt: dict) -> str:
    """docs/README.md of a one-prompt bundle."""
    dataset, label = prompt["dataset"], prompt["label"]
    folds = "\n".join(f"| {f} | {_dice_text(s)} |" for f, s in dice.items())
    mean = meta["eval_metrics"].get("mean_dice")
    cross_validation = "\n".join([
        f"Dice of {dataset}/{label} on each fold's validation cases (`validation/summary.json`, computed in the",
        "preprocessed grid during training, without mirroring or ensembling):", "", "| fold | Dice |", "|---|---|",
        folds, "", f"Mean: {_dice_text(mean)}."])
    return _card(meta, plans, dataset,
                 selection=f"prompt\n`{dataset}/{label}` (index {prompt['index']}).",
                 scope=f"One prompt of a multi-dataset model: it segments {label} only.",
                 cross_validation=cross_validation, output="output `p > 0.5` as uint8 `CASE.nii.gz`.", labels="",
                 command=f"versemi_predict -p {dataset}:{label} --precision {meta['versemi']['precision']}",
                 rounding="flip a voxel whose probability lies within about 1e-6 of 0.5.")


def label_map_model_card(meta: dict, dice: dict[str, dict[str, float | None]], plans: dict, table: LabelTable) -> str:
    """docs/README.md of a bundle of several prompts (one label map)."""
    prompts = list(table.prompts)
    names = [_prompt_name(p) for p in prompts]
    folds = list(next(iter(dice.values())))
    rows = "\n".join(f"| {f} | " + " | ".join(_dice_text(dice[n][f]) for n in names) + " |" for f in folds)
    means = ", ".join(f"{n} {_dice_text(meta['eval_metrics'].get(f'{n}_mean_dice'))}" for n in names)
    cross_validation = f"""Dice of each prompt on each fold's validation cases (`validation/summary.json`, computed in
the preprocessed grid during training, without mirroring or ensembling):

| fold | {' | '.join(names)} |
|---{'|---' * len(names)}|
{rows}

Mean: {means}."""
    entries = "\n".join(f"| {v} | {p['dataset']} | {p['label']} | {p['label_value']} | {p['index']} |"
                         for p, v in zip(prompts, table.values))
    dtype = "uint16" if max(table.values) > 255 else "uint8"
    labels = f"""
## Labels
One label map per case, `CASE.nii.gz` ({dtype}). `configs/labels.json` (written to the output folder as
`labels.json` too, the table `versemi_predict` writes) holds its values:

| value | dataset | label | the dataset's own value | prompt |
|---|---|---|---|---|
| 0 | background | | | |
{entries}

Values: {table.to_json()['values']}.
Overlaps: {OVERLAP_RULE}.
`models/model.ts` returns {len(prompts) + 1} channels: 0 the background (the constant 0.5), 1..{len(prompts)} the
prompts' probabilities in this order; their argmax is this rule, which `LabelMapd`
(`scripts/inference.py`) applies.
"""
    return _card(meta, plans, prompts[0]["dataset"],
                 selection=f"prompts\n{', '.join(f'`{n}`' for n in names)} (indices "
                           f"{', '.join(str(p['index']) for p in prompts)}) in one label map.",
                 scope=f"{len(prompts)} prompts of a multi-dataset model in one label map:\nit segments "
                       f"{', '.join(names)} only.",
                 cross_validation=cross_validation, output=f"output one label map (see Labels) as {dtype} "
                                                           "`CASE.nii.gz`.", labels=labels,
                 command="versemi_predict -p " + " ".join(f"{p['dataset']}:{p['label']}" for p in prompts)
                 + f" --precision {meta['versemi']['precision']}",
                 rounding="change a voxel whose largest probability lies within about 1e-6 of 0.5 or of "
                          "another prompt's.")


def known_absent_section(plans: dict) -> str:
    """The card's note on structures the training plan declares absent from a dataset's images
    (``known_absent``): learnt absent there, yet predicted on every image by the bundle, which does
    not know where an image comes from; empty without a declaration."""
    view = PlansView(plans)
    if not view.declares_absence:
        return ""
    rows = "\n".join(f"| {d} | {', '.join(view.known_absent(d))} |" for d in view.dataset_names if view.known_absent(d))
    return f"""
## Structures declared absent
Training declared these structures absent from each dataset's images, and learnt them absent there:

| images of | never contain |
|---|---|
{rows}

This bundle runs every exported prompt on every image: it cannot tell which dataset an image comes
from, so it does not leave these structures out. With the training checkpoints,
`versemi_predict --from-dataset DATASET` does (and lists them under `not_predicted` in `labels.json`).
"""


def _precision_text(precision: str) -> str:
    if precision == "fp32":
        return "exported for fp32: the network computes in float32 on every machine."
    return (f"exported for {precision}: the network computes under {precision} autocast on every machine. That is "
            f"fast on CPUs with bf16 units (AMX, AVX512-BF16) and on GPUs, but emulated and far slower on other "
            f"CPUs; export again with `versemi_export_bundle --precision fp32` for those. It agrees with "
            f"`versemi_predict --precision {precision}` but where {precision} rounding decides: a voxel whose "
            f"probability lies within about 2e-2 of the decision may go either way.")


def _dice_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _card(meta: dict, plans: dict, dataset: str, *, selection: str, scope: str, cross_validation: str, output: str,
          labels: str, command: str, rounding: str) -> str:
    """The model card; the arguments are the parts that depend on the exported prompts."""
    v = meta["versemi"]
    plan = PlansView(plans).dataset_plan(dataset, v["configuration"])
    norm = plan["normalization"][0]
    if norm["scheme"] == "ct":
        normalization = (f"CT: clip to [{norm['clip'][0]:g}, {norm['clip'][1]:g}], then (x - {norm['mean']:.4g}) / "
                         f"{norm['std']:.4g}")
    else:
        normalization = "z-score per image" + (" inside the nonzero region" if norm.get("use_nonzero_mask") else "")
    rows = "\n".join(f"| {d} | {', '.join(f'{k}={v}' for k, v in plans['datasets'][d]['labels'].items())} | "
                     f"{len(plans['datasets'][d].get('labeled_cases', []))} | "
                     f"{len(plans['datasets'][d].get('unlabeled_cases', []))} |" for d in plans["dataset_names"])
    spacing_xyz = ", ".join("the image's own" if s is None else f"{s:g}" for s in reversed(plan["target_spacing"]))
    patch_xyz = " x ".join(str(s) for s in reversed(v["patch_size_zyx"]))
    flipped = sum(side > 1 for side in v["patch_size_zyx"])  # a 2d model (one slice) is not flipped along z
    mirroring = f"mirroring over {flipped} axes" + (" (slice by slice: a 2d model)" if flipped == 2 else "")
    changelog = "\n".join(f"- {k}: {c}" for k, c in sorted(meta["changelog"].items()))
    return f"""# {meta['name']}

{meta['description']}

Version {meta['version']}. Exported by versemi {v['versemi_version']} from experiment `{v['experiment']}`
({v['trainer']}, configuration {v['configuration']}, fold(s) {', '.join(v['folds'])}), {selection}

## Intended use and limitations
For research and clinical pilot studies only. **This is not a medical device**: it is not cleared or
approved for diagnosis or treatment decisions, and every output needs review by a qualified person.
It was validated only on the data below; expect lower accuracy on other scanners, protocols,
anatomy or pathology. {scope}

## Training data
| dataset | labels | labeled cases | unlabeled cases |
|---|---|---|---|
{rows}

{known_absent_section(plans)}
## Cross-validation
{cross_validation}

## Input requirements
- NIfTI images (`.nii.gz`, `.nii`), one 3D file per channel: `CASE_0000.nii.gz` ({', '.join(plan['channel_names'])});
  a single-channel image may also be named `CASE.nii.gz`.
- Modality: {', '.join(plan['channel_names'])}. Any orientation and spacing: images are not reoriented;
  they are resampled to {spacing_xyz} mm (x, y, z) inside the pipeline and the result is returned
  in the input's own voxel grid, spacing, origin and direction.
- Preprocessing: crop to the nonzero region; {normalization}; spline resampling; Gaussian sliding
  window with patch {patch_xyz} (x, y, z) and overlap 0.5; {mirroring} and the mean over
  the folds inside `models/model.ts`; {output}
- Precision: {_precision_text(v['precision'])}
- Runtime: PyTorch (`models/model.ts`). No OpenVINO model is included: `monai.bundle run` loads
  TorchScript only. On a CPU, `versemi_predict --backend openvino` with the training checkpoints is the
  faster path.
{labels}
## Run
```bash
pip install "monai=={meta['monai_version']}" {' '.join(f'{k}' for k in meta['required_packages_version'])}
python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN --output_dir OUT
python -m monai.bundle verify_net_in_out --net_id network_def --meta_file configs/metadata.json \\
    --config_file configs/inference.json
```
The bundle folder is found from `--config_file`; from Python pass `bundle_root`. Before the model
loads, `scripts/inference.py` compares every model file with `models/checksums.json` (SHA-256) and
stops on any difference. `models/model.pt` is the plain state dict of the module in `model.ts`
(`torch.load(..., weights_only=True)`); `networks.<i>.*` is the network of the i-th fold of
({', '.join(v['folds'])}), rebuilt in versemi with `versemi.nets.build_network` and the plan's network.

## Agreement with versemi_predict
The same steps as `{command}` with these folds: MONAI transforms for
reading, cropping, normalization and the sliding window, and versemi's own resampling
(`ResampleToSpacingd` in `scripts/inference.py`: edge-aligned third-order splines there, trilinear
back). Only float rounding differs (the folds and flips are summed in another order), which can
{rounding}

## Version history
{changelog}

## License
Apache-2.0 (see LICENSE). The training data keep their own licenses.
"""


# ----- export -----
def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise input_error(output, "exists and is not a folder", "choose a new folder for -o")
    if output.is_dir():
        if not overwrite:
            raise input_error(output, "exists already", "pass --overwrite to replace it, or choose another -o")
        if any(output.iterdir()) and not (output / "configs" / "metadata.json").is_file():
            raise input_error(output, "exists and is not a bundle (no configs/metadata.json); --overwrite only "
                                      "replaces a bundle", "choose a new or empty folder for -o")


def _write(folder: Path, relative: str, data: bytes) -> None:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _replace(tmp: Path, output: Path) -> None:
    """Move the finished bundle onto ``output`` (the old bundle is removed only after the new one is in place)."""
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, old / output.name)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def select_prompts(plans: dict, prompt: str | Sequence[str] | None) -> list[dict]:
    """The prompts to export, named as for versemi_predict (``resolve_prompts``): one text, several,
    ``all``, or None (all)."""
    return resolve_prompts(plans, [prompt] if isinstance(prompt, str) else prompt)


def _prompt_option(prompt: str | Sequence[str] | None) -> str:
    texts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    return f"-p {' '.join(texts)}" if texts else "-p all (the default)"


def _preprocessing(plan: dict) -> str:
    """The bundle transforms a dataset plan gives: datasets with the same ones can share a bundle."""
    return json.dumps([normalization_transforms(plan["normalization"]), spacing_transform(plan["target_spacing"])],
                      sort_keys=True)


def _describe_preprocessing(dataset: str, plan: dict) -> str:
    norm = plan["normalization"][0]
    scheme = (f"CT normalization (clip {norm['clip']}, mean {norm['mean']:.4g}, std {norm['std']:.4g})"
              if norm["scheme"] == "ct" else f"{norm['scheme']} normalization")
    spacing = " x ".join("own" if s is None else f"{s:g}" for s in plan["target_spacing"])
    return f"{dataset}: {scheme}, spacing {spacing} mm (z, y, x)"


def shared_dataset_plan(plans: dict, prompts: list[dict], option: str, configuration: str | None = None) -> dict:
    """The dataset plan (as ``configuration`` sees it) whose preprocessing every prompt's dataset
    has; the bundle has one pipeline, so prompts of datasets that differ in normalization or target
    spacing raise InputError."""
    view = PlansView(plans)
    datasets = list(dict.fromkeys(p["dataset"] for p in prompts))
    dataset_plans = {d: view.dataset_plan(d, configuration) for d in datasets}
    if len({_preprocessing(plan) for plan in dataset_plans.values()}) > 1:
        per_dataset = ["versemi_export_bundle -p " + " ".join(f"{d}:{p['label']}" for p in prompts if p["dataset"] == d)
                       for d in datasets]
        raise input_error(option, "a bundle has one preprocessing pipeline, and these prompts' datasets are "
                                  "preprocessed differently: " + "; ".join(_describe_preprocessing(d, plan) for d, plan
                                                                           in dataset_plans.items()),
                          f"export one bundle per dataset ({', then '.join(per_dataset)}), or name prompts of "
                          "datasets that share normalization and target spacing")
    return dataset_plans[datasets[0]]


def default_bundle_name(experiment: str, plans: dict, prompts: list[dict]) -> str:
    """``<experiment>_<dataset>_<label>`` for one prompt, ``<experiment>_all`` for every prompt,
    ``<experiment>_<dataset>`` for all of one dataset's, else the prompts joined by ``+``."""
    view = PlansView(plans)
    indices = [p["index"] for p in prompts]
    datasets = list(dict.fromkeys(p["dataset"] for p in prompts))
    if len(prompts) == 1:
        return f"{experiment}_{prompts[0]['dataset']}_{prompts[0]['label']}"
    if indices == view.real_prompt_indices:
        return f"{experiment}_all"
    if len(datasets) == 1 and indices == [p["index"] for p in view.prompts_of(datasets[0])]:
        return f"{experiment}_{datasets[0]}"
    return f"{experiment}_" + "+".join(f"{p['dataset']}_{p['label']}" for p in prompts)


def export_bundle(output: str | Path | None, prompt: str | Sequence[str] | None = None, experiment: str | None = None,
                  folds: Iterable[str] | None = None, trainer: str = "VerSemiTrainer",
                  configuration: str = "3d_fullres", checkpoint: str = "final", overwrite: bool = False,
                  version: str = BUNDLE_VERSION, authors: str = "VerSemi contributors",
                  copyright_: str = "Copyright (c) VerSemi contributors", plans_root: Path | None = None,
                  member: str | None = None, precision: str = "fp32") -> Path:
    """Write the MONAI bundle of prompts of a trained experiment; returns the bundle folder.

    ``prompt``: as versemi_predict's ``-p``: one prompt (a 0/1 mask), several or ``all`` (one
    label map and ``configs/labels.json``); None: all. ``experiment``: its name (None: the single
    planned one). ``output`` None: ``$VERSEMI_BUNDLES/`` + ``default_bundle_name``. ``member``:
    one network of a trainer that trains several (None: all of them, averaged like folds).
    ``precision``: what the bundle computes in (``BUNDLE_PRECISIONS``), recorded in its metadata
    and model card; it agrees with ``versemi_predict --precision`` of the same name.
    Bad input (unknown prompt, prompts of datasets preprocessed differently, a fold never trained,
    an existing output without ``overwrite``) raises InputError before anything is written.
    """
    if precision not in BUNDLE_PRECISIONS:
        raise input_error(f"--precision {precision}", "is not a precision a bundle can be exported for",
                          f"use one of {', '.join(BUNDLE_PRECISIONS)} (fp32 runs alike on every machine)")
    experiment_dir = find_experiment_dir(experiment, plans_root)
    ensemble = load_models(experiment_dir, folds, trainer, configuration, checkpoint, "cpu", member=member)
    ensemble.precision = precision
    plans = ensemble.plans
    chosen = select_prompts(plans, prompt)
    plan = shared_dataset_plan(plans, chosen, _prompt_option(prompt), configuration)
    if output is None:
        output = paths.bundles_root() / default_bundle_name(experiment_dir.name, plans, chosen)
    output = Path(output).absolute()
    _check_output(output, overwrite)
    # the window of the chosen structures' dataset (a joint plan may give a dataset a patch of its own)
    datasets = list(dict.fromkeys(p["dataset"] for p in chosen))
    patch_sizes = {tuple(m.patch_for(d)) for m in ensemble.models for d in datasets}
    if len(patch_sizes) != 1:
        raise InputError([Problem(str(m.checkpoint), f"fold {m.fold} slides patch "
                                  f"{' / '.join(str(m.patch_for(d)) for d in datasets)} over {' / '.join(datasets)}",
                                  "export folds trained with the same patch size (choose them with -f), or the "
                                  "structures of one dataset (-p)")
                          for m in ensemble.models])
    patch_size = list(patch_sizes.pop())
    table = label_table(chosen) if len(chosen) > 1 else None
    config = inference_config(ensemble.in_channels, patch_size, plan["target_spacing"], plan["normalization"],
                              None if table is None else table.values)
    networks = [m.network for m in ensemble.models]
    module = BundleNetwork(networks, chosen[0]["index"], precision=precision, patch_size=patch_size) if table is None \
        else LabelMapNetwork(networks, [p["index"] for p in chosen], precision=precision, patch_size=patch_size)
    models = _model_files(module.eval(), ensemble)
    checksums = {"algorithm": "sha256", "sha256": {name: _sha256(data) for name, data in models.items()}}
    files = {
        **_description_files(ensemble, chosen, table, patch_size, version, authors, copyright_),
        "configs/inference.json": _json_bytes(config),
        "configs/logging.conf": (TEMPLATES / "logging.conf").read_bytes(),
        **models,
        "models/checksums.json": _json_bytes(checksums),
        "scripts/__init__.py": (TEMPLATES / "scripts" / "__init__.py").read_bytes(),
        "scripts/inference.py": (TEMPLATES / "scripts" / "inference.py").read_bytes(),
        "LICENSE": (TEMPLATES / "LICENSE").read_bytes(),
    }
    _write_bundle(files, output, overwrite)
    return output


def _write_bundle(files: dict[str, bytes], output: Path, overwrite: bool) -> None:
    """Write ``files`` into a hidden folder next to ``output``, then rename it onto ``output``.

    One export of ``output`` at a time (a lock file next to it): it first clears what a killed
    export left there, which a running one would still be writing.
    """
    with run_lock(output.parent / f".{output.name}.lock", "versemi_export_bundle"):
        _remove_leftovers(output)
        _check_output(output, overwrite)  # still free (or still a bundle) after the slow part
        tmp = None
        try:
            with disk_space_checked(output, output.parent):
                tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
                for relative, data in files.items():
                    _write(tmp, relative, data)
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp creates 0700; give the bundle the usual permissions
            _replace(tmp, output)
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _remove_leftovers(output: Path) -> None:
    """Delete the hidden folders a killed export of ``output`` left (see ``_write_bundle`` and ``_replace``).

    Killed between the two renames of ``_replace``, it left no bundle at ``output`` and the previous
    one in an ``.old-`` folder: that one is put back, as if the export had never started.
    """
    leftover = re.compile(rf"\.{re.escape(output.name)}\.(partial|old)-[^.]+")
    for folder in sorted(output.parent.iterdir()):
        match = leftover.fullmatch(folder.name)
        if match is None or not folder.is_dir():
            continue
        if match[1] == "old" and (folder / output.name).is_dir() and not output.exists():
            os.replace(folder / output.name, output)
            print(f"note: {output}: put back the bundle an interrupted export had moved aside", file=sys.stderr)
        shutil.rmtree(folder)


def _model_files(module: nn.Module, ensemble: Ensemble) -> dict[str, bytes]:
    """models/model.ts (traced ``module``) and models/model.pt (its plain state dict)."""
    # every network must take the traced sizes: the least common multiple of their divisors (members may differ)
    divisor = [math.lcm(*axis) for axis in zip(*(m.network.divisor for m in ensemble.models))]
    traced = trace_network(module, ensemble.in_channels, divisor,
                           one_slice=all(m.patch_size[0] == 1 for m in ensemble.models))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    models = {"models/model.ts": buffer.getvalue()}
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, buffer)
    models["models/model.pt"] = buffer.getvalue()
    return models


def _description_files(ensemble: Ensemble, prompts: list[dict], table: LabelTable | None, patch_size: list[int],
                       version: str, authors: str, copyright_: str) -> dict[str, bytes]:
    """configs/metadata.json and docs/README.md (and configs/labels.json for several prompts)."""
    if table is None:
        dice = cross_validation_dice(ensemble, _prompt_name(prompts[0]))
        meta = metadata(ensemble, prompts[0], patch_size, dice, version, authors, copyright_)
        return {"configs/metadata.json": _json_bytes(meta),
                "docs/README.md": model_card(meta, dice, ensemble.plans, prompts[0]).encode()}
    dice = {_prompt_name(p): cross_validation_dice(ensemble, _prompt_name(p)) for p in prompts}
    meta = label_map_metadata(ensemble, table, patch_size, dice, version, authors, copyright_)
    # formatted as versemi_predict writes labels.json, so the two files are byte-identical
    return {"configs/metadata.json": _json_bytes(meta), LABELS: (json.dumps(table.to_json(), indent=2) + "\n").encode(),
            "docs/README.md": label_map_model_card(meta, dice, ensemble.plans, table).encode()}
