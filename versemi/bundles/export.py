"""Export one prompt of a trained experiment as a MONAI bundle that runs without versemi.

    bundle = export_bundle("bundles/la_versemi", "LA", folds=["0", "1"])
    # python -m monai.bundle run --config_file bundles/la_versemi/configs/inference.json \
    #     --dataset_dir IN --output_dir OUT

The bundle does what ``versemi_predict`` does for that prompt, with MONAI's transforms where they
compute the same thing: crop to the nonzero region (CropForegroundd), the dataset plan's
normalization (ScaleIntensityRanged / NormalizeIntensityd), resampling to the plan's spacing
(versemi's own algorithm, ``ResampleToSpacingd`` in the bundle's scripts: MONAI's Spacingd aligns
the grid differently), Gaussian sliding window (overlap 0.5) with the trained patch size, mirroring
over the 3 axes and the mean over the exported folds (both inside ``models/model.ts``), inversion
to the input's voxel grid (Invertd), and ``p > 0.5`` written in the input's geometry. Layout::

    configs/metadata.json     the MONAI metadata (mandatory keys of the bundle spec, provenance)
    configs/inference.json    the inference workflow; every path hangs off ``bundle_root``
    configs/logging.conf
    models/model.ts           TorchScript: (B, C, X, Y, Z) -> (B, 2, X, Y, Z) probabilities, prompt
                              fixed, averaged over the 8 mirror flips and the exported folds
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
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from .. import __version__ as versemi_version
from .. import paths
from ..errors import InputError, Problem, input_error
from ..inference.predictor import Ensemble, find_experiment_dir, load_models, mirror_axes, resolve_prompt
from ..plans.view import PlansView

BUNDLE_VERSION = "0.1.0"
# the JSON schema of metadata.json the MONAI model zoo validates against (monai.bundle verify_metadata)
METADATA_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                   "meta_schema_20240725.json")
# packages the bundle needs beyond MONAI, torch and numpy (reading NIfTI, spline resampling, the CLI)
REQUIRED_PACKAGES = ("nibabel", "scipy", "fire", "pyyaml")
TEMPLATES = Path(__file__).resolve().parent / "templates"
SW_BATCH_SIZE = 2  # windows per network call, as versemi_predict


class BundleNetwork(nn.Module):
    """The exported model: one prompt's foreground probabilities, averaged over mirror flips and folds.

    Takes MONAI's ``(B, C, X, Y, Z)`` arrays (the networks were trained on ``(B, C, Z, Y, X)``) and
    returns ``(B, 2, X, Y, Z)`` probabilities (background, target), as ``versemi_predict`` computes
    them per sliding window: softmax per flip, flipped back, mean over the 8 flips and the folds.
    """

    def __init__(self, networks: Sequence[nn.Module], prompt_index: int, mirroring: bool = True) -> None:
        super().__init__()
        self.networks = nn.ModuleList(networks)
        self.prompt_index = int(prompt_index)
        self.flips = mirror_axes(mirroring)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 1, 4, 3, 2)  # (B, C, X, Y, Z) -> (B, C, Z, Y, X)
        # (B, 1) prompt matrix built from x: a traced graph then keeps the batch size and the device
        # dynamic (PromptedSegmenter.head would move the prompts to the trace's device, baked in)
        prompts = torch.zeros_like(x[:, :1, 0, 0, 0], dtype=torch.long) + self.prompt_index
        total, count = None, 0
        for network in self.networks:
            for axes in self.flips:
                flipped = torch.flip(x, axes) if axes else x
                logits = network.prompt_head(network.features(flipped), prompts)[0][:, 0]  # (B, 2, Z, Y, X)
                p = torch.softmax(logits.float(), dim=1)
                p = torch.flip(p, axes) if axes else p
                total = p if total is None else total + p
                count += 1
        return (total / count).permute(0, 1, 4, 3, 2)


# ----- the bundle's parts -----
def trace_network(module: BundleNetwork, in_channels: int, divisor: Sequence[int]) -> torch.jit.ScriptModule:
    """TorchScript of ``module`` (eval mode), traced on a small input and checked on another size.

    The trace runs on twice the network's divisor per axis (cheap even for large networks; the
    graph holds no sizes) and is compared with the eager module on three times the divisor.
    """
    module = module.eval()
    size_xyz = [2 * d for d in reversed(divisor)]
    example = torch.zeros(1, in_channels, *size_xyz)
    with warnings.catch_warnings():
        # trace-time checks of the network (input size, prompt range) become constants: intended
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        with torch.no_grad():
            traced = torch.jit.trace(module, example, check_trace=False, _store_inputs=False)
    check = torch.Generator().manual_seed(0)
    probe = torch.rand(2, in_channels, *[3 * d for d in reversed(divisor)], generator=check)
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
    (x, y, z): the plan's (z, y, x) spacing is reversed.
    """
    pixdim = [float(s) for s in reversed(target_spacing_zyx)]
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


def inference_config(in_channels: int, patch_size_zyx: Sequence[int], target_spacing_zyx: Sequence[float],
                     channel_plans: list[dict]) -> dict:
    """configs/inference.json: the versemi_predict pipeline in MONAI's (x, y, z) axis order."""
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
        # argmax of (1 - p, p): p > 0.5, versemi_predict's threshold
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "",
         "writer": "NibabelWriter", "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8", "resample": False,
         "separate_folder": False, "squeeze_end_dims": True, "print_log": False,
         "output_name_formatter": OUTPUT_NAME},
    ]
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
        "run": ["$@code['predict'](@dataloader, @inferer, @network, @postprocessing, @device)"],
    }


def cross_validation_dice(ensemble: Ensemble, prompt_key: str) -> dict[str, float | None]:
    """Each exported fold's validation Dice of the prompt (``validation/summary.json``; None if absent)."""
    scores = {}
    for model in ensemble.models:
        summary = model.checkpoint.parent / "validation" / "summary.json"
        value = None
        if summary.is_file():
            try:
                value = json.loads(summary.read_text()).get("mean_dice", {}).get(prompt_key)
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
    plan = PlansView(plans).dataset_plan(dataset)
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
            "target_spacing_zyx": plan["target_spacing"],
            "normalization": plan["normalization"],
            "axis_order": "MONAI arrays and spatial_shape are (x, y, z); versemi's plans are (z, y, x)",
            "model_pt": "state dict of models/model.ts's module: networks.<i>.* is fold folds[i]'s network "
                        "(versemi.nets.build_network with the plan's network)",
        },
    }


def model_card(meta: dict, dice: dict[str, float | None], plans: dict, prompt: dict) -> str:
    """docs/README.md."""
    v = meta["versemi"]
    dataset, label = prompt["dataset"], prompt["label"]
    plan = PlansView(plans).dataset_plan(dataset)
    norm = plan["normalization"][0]
    if norm["scheme"] == "ct":
        normalization = (f"CT: clip to [{norm['clip'][0]:g}, {norm['clip'][1]:g}], then (x - {norm['mean']:.4g}) / "
                         f"{norm['std']:.4g}")
    else:
        normalization = "z-score per image" + (" inside the nonzero region" if norm.get("use_nonzero_mask") else "")
    rows = "\n".join(f"| {d} | {', '.join(f'{k}={v}' for k, v in plans['datasets'][d]['labels'].items())} | "
                     f"{len(plans['datasets'][d].get('labeled_cases', []))} | "
                     f"{len(plans['datasets'][d].get('unlabeled_cases', []))} |" for d in plans["dataset_names"])
    folds = "\n".join(f"| {f} | {'n/a' if s is None else f'{s:.4f}'} |" for f, s in dice.items())
    mean = meta["eval_metrics"].get("mean_dice")
    spacing_xyz = ", ".join(f"{s:g}" for s in reversed(plan["target_spacing"]))
    patch_xyz = " x ".join(str(s) for s in reversed(v["patch_size_zyx"]))
    changelog = "\n".join(f"- {k}: {c}" for k, c in sorted(meta["changelog"].items()))
    return f"""# {meta['name']}

{meta['description']}

Version {meta['version']}. Exported by versemi {v['versemi_version']} from experiment `{v['experiment']}`
({v['trainer']}, configuration {v['configuration']}, fold(s) {', '.join(v['folds'])}), prompt
`{dataset}/{label}` (index {prompt['index']}).

## Intended use and limitations
For research and clinical pilot studies only. **This is not a medical device**: it is not cleared or
approved for diagnosis or treatment decisions, and every output needs review by a qualified person.
It was validated only on the data below; expect lower accuracy on other scanners, protocols,
anatomy or pathology. One prompt of a multi-dataset model: it segments {label} only.

## Training data
| dataset | labels | labeled cases | unlabeled cases |
|---|---|---|---|
{rows}

## Cross-validation
Dice of {dataset}/{label} on each fold's validation cases (`validation/summary.json`, computed in the
preprocessed grid during training, without mirroring or ensembling):

| fold | Dice |
|---|---|
{folds}

Mean: {'n/a' if mean is None else f'{mean:.4f}'}.

## Input requirements
- NIfTI images (`.nii.gz`, `.nii`), one 3D file per channel: `CASE_0000.nii.gz` ({', '.join(plan['channel_names'])});
  a single-channel image may also be named `CASE.nii.gz`.
- Modality: {', '.join(plan['channel_names'])}. Any orientation and spacing: images are not reoriented;
  they are resampled to {spacing_xyz} mm (x, y, z) inside the pipeline and the result is returned
  in the input's own voxel grid, spacing, origin and direction.
- Preprocessing: crop to the nonzero region; {normalization}; spline resampling; Gaussian sliding
  window with patch {patch_xyz} (x, y, z) and overlap 0.5; mirroring over 3 axes and the mean over
  the folds inside `models/model.ts`; output `p > 0.5` as uint8 `CASE.nii.gz`.

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
The same steps as `versemi_predict -p {dataset}:{label}` with these folds: MONAI transforms for
reading, cropping, normalization and the sliding window, and versemi's own resampling
(`ResampleToSpacingd` in `scripts/inference.py`: edge-aligned third-order splines there, trilinear
back). Only float rounding differs (the folds and flips are summed in another order), which can
flip a voxel whose probability lies within about 1e-6 of 0.5.

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


def export_bundle(output: str | Path | None, prompt: str, experiment: str | None = None,
                  folds: Iterable[str] | None = None, trainer: str = "VerSemiTrainer",
                  configuration: str = "3d_fullres", checkpoint: str = "final", overwrite: bool = False,
                  version: str = BUNDLE_VERSION, authors: str = "VerSemi contributors",
                  copyright_: str = "Copyright (c) VerSemi contributors", plans_root: Path | None = None) -> Path:
    """Write the MONAI bundle of one prompt of a trained experiment; returns the bundle folder.

    ``experiment``: its name (None: the single planned one), as for versemi_predict. ``output``
    None: ``$VERSEMI_BUNDLES/<experiment>_<dataset>_<label>``.
    Bad input (unknown prompt, a fold never trained, an existing output without ``overwrite``)
    raises InputError before anything is written.
    """
    experiment_dir = find_experiment_dir(experiment, plans_root)
    ensemble = load_models(experiment_dir, folds, trainer, configuration, checkpoint, "cpu")
    chosen = resolve_prompt(ensemble.plans, prompt)
    if output is None:
        output = paths.bundles_root() / f"{experiment_dir.name}_{chosen['dataset']}_{chosen['label']}"
    output = Path(output).absolute()
    _check_output(output, overwrite)
    patch_sizes = {tuple(m.patch_size) for m in ensemble.models}
    if len(patch_sizes) != 1:
        raise InputError([Problem(str(m.checkpoint), f"fold {m.fold} was trained with patch {m.patch_size}",
                                  "export folds trained with the same patch size (choose them with -f)")
                          for m in ensemble.models])
    patch_size = list(patch_sizes.pop())
    plans = ensemble.plans
    plan = PlansView(plans).dataset_plan(chosen["dataset"])
    config = inference_config(ensemble.in_channels, patch_size, plan["target_spacing"], plan["normalization"])

    module = BundleNetwork([m.network for m in ensemble.models], chosen["index"]).eval()
    traced = trace_network(module, ensemble.in_channels, ensemble.models[0].network.divisor)
    models = {}
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    models["models/model.ts"] = buffer.getvalue()
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, buffer)
    models["models/model.pt"] = buffer.getvalue()
    checksums = {"algorithm": "sha256", "sha256": {name: _sha256(data) for name, data in models.items()}}

    dice = cross_validation_dice(ensemble, f"{chosen['dataset']}/{chosen['label']}")
    meta = metadata(ensemble, chosen, patch_size, dice, version, authors, copyright_)
    files = {
        "configs/metadata.json": _json_bytes(meta),
        "configs/inference.json": _json_bytes(config),
        "configs/logging.conf": (TEMPLATES / "logging.conf").read_bytes(),
        **models,
        "models/checksums.json": _json_bytes(checksums),
        "scripts/__init__.py": (TEMPLATES / "scripts" / "__init__.py").read_bytes(),
        "scripts/inference.py": (TEMPLATES / "scripts" / "inference.py").read_bytes(),
        "docs/README.md": model_card(meta, dice, plans, chosen).encode(),
        "LICENSE": (TEMPLATES / "LICENSE").read_bytes(),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        for relative, data in files.items():
            _write(tmp, relative, data)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; give the bundle the usual permissions
        _check_output(output, overwrite)  # still free (or still a bundle) after the slow part
        _replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
