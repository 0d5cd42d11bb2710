"""Trained networks run by OpenVINO on a CPU (``versemi_predict --backend``).

On a CPU, eager PyTorch spends almost all of a prediction in the network. OpenVINO runs the same
network, converted once, 2 to 5 times faster (``benchmarks/predict_time.py``; ONNX Runtime was
measured too and gave about 1.3x, so it is not offered). OpenVINO is an optional extra
(``pip install versemi[openvino]``); without it prediction runs in PyTorch as before.

The whole network is converted, backbone and prompt head, with the batch and the number of
prompts left free, so every prompt of a multi-prompt model, every fold and every member goes
through it, and the sliding window, mirroring and stitching stay those of the torch path.

Converted models are cached beside the checkpoint, in ``<checkpoint>.openvino/``, one folder per
checkpoint digest, member, window shape and precision (a joint model whose datasets have patches
of their own gets one per shape), written under a temporary name and renamed, so an
interrupted conversion leaves nothing behind. An entry of another digest (the checkpoint was
trained further or replaced) is stale: it is removed and converted again, never used.

Before a converted model is used it must agree with the torch path in fp32 (``check_agreement``):
on a fixed input, at most ``MAX_DISAGREEMENT`` of the voxels may change their thresholded label.
The result is stored with the model. ``auto`` uses OpenVINO on a CPU where it is installed and the
model passed; otherwise PyTorch, and the reason is reported.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import input_error
from ..model.config import distinct_patches
from .models import Ensemble, FoldModel
from .sliding_window import inference_dtype

BACKENDS = ("auto", "torch", "openvino")
BACKEND_VARIABLE = "VERSEMI_PREDICT_BACKEND"  # the default of --backend
INSTALL_HINT = "pip install 'versemi[openvino]'"
# Share of voxels (over prompts and the check's windows) whose 0.5-threshold label may differ from
# the fp32 torch network's: 1e-3 keeps the Dice of any structure larger than a few hundred voxels
# above 0.999.
MAX_DISAGREEMENT = 1e-3
CHECK_SEED = 0


def default_backend() -> str:
    """``$VERSEMI_PREDICT_BACKEND`` (e.g. torch on a server that should never convert), else auto."""
    value = os.environ.get(BACKEND_VARIABLE, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise input_error(f"${BACKEND_VARIABLE}={value}", "is not a backend", f"set it to one of {', '.join(BACKENDS)}")
    return value


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version()


def checkpoint_digest(path: Path) -> str:
    """SHA-256 of the checkpoint file (first 16 hex digits): a retrained checkpoint gets a new one."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def openvino_precision(precision: str) -> str:
    """OpenVINO's inference precision for ``--precision`` on a CPU: bf16 where torch would use it
    (auto on a CPU with bf16 units, or bf16), f32 otherwise."""
    dtype = inference_dtype(precision, torch.device("cpu"))  # refuses fp16 on a CPU, as the torch path does
    return "bf16" if dtype == torch.bfloat16 else "f32"


class _WholeNetwork(torch.nn.Module):
    """The network's eval-mode forward over (images, prompt matrix), as OpenVINO converts it (the
    prompt indices are checked before every call, in ``ConvertedNetwork``)."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        return self.network.prompt_head(self.network.features(images), prompts)[0]


class ConvertedNetwork:
    """A compiled OpenVINO model called like the network: (B, C, *S) images and (B,) or (B, K)
    prompt indices -> fp32 logits (B, 2, *S) or (B, K, 2, *S), as torch tensors."""

    def __init__(self, compiled, num_prompts: int, folder: Path, precision: str) -> None:
        self.compiled, self.num_prompts, self.folder, self.precision = compiled, num_prompts, folder, precision

    def __call__(self, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        matrix = prompts[:, None] if prompts.dim() == 1 else prompts
        if matrix.numel() == 0 or int(matrix.min()) < 0 or int(matrix.max()) >= self.num_prompts:
            raise ValueError(f"prompt indices must lie in [0, {self.num_prompts - 1}]; got {matrix.tolist()}")
        images = np.ascontiguousarray(images.detach().float().cpu().numpy())
        logits = torch.from_numpy(self.compiled([images, matrix.detach().cpu().numpy().astype(np.int64)])[0].copy())
        return logits[:, 0] if prompts.dim() == 1 else logits

    def eval(self) -> "ConvertedNetwork":
        return self


class ConvertedByPatch:
    """The converted models of one network, one per window shape it slides (a joint plan's
    datasets with patches of their own): each call goes to the model of its windows' shape."""

    def __init__(self, by_patch: dict[tuple[int, ...], ConvertedNetwork]) -> None:
        self.by_patch = by_patch

    def __call__(self, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        shape = tuple(int(s) for s in images.shape[2:])
        if shape not in self.by_patch:
            raise ValueError(f"no converted model for windows of {list(shape)}; converted: "
                             f"{[list(p) for p in self.by_patch]}")
        return self.by_patch[shape](images, prompts)

    def eval(self) -> "ConvertedByPatch":
        return self




@dataclass
class CacheEntry:
    """Where one converted model lies, and what it was converted from."""

    folder: Path
    digest: str
    member: str
    patch_size: list[int]
    precision: str

    @property
    def model_file(self) -> Path:
        return self.folder / "model.xml"

    @property
    def record_file(self) -> Path:
        return self.folder / "agreement.json"


def cache_entry(model: FoldModel, precision: str, digest: str | None = None,
                patch_size: list[int] | None = None) -> CacheEntry:
    """The cache folder of ``model`` at ``precision`` (``openvino_precision``), for windows of
    ``patch_size`` (None: the model's patch)."""
    digest = digest or checkpoint_digest(model.checkpoint)
    member = model.member or "network"
    patch = list(patch_size or model.patch_size)
    shape = "x".join(str(int(s)) for s in patch)
    root = model.checkpoint.parent / f"{model.checkpoint.name}.openvino"
    return CacheEntry(root / f"{member}-{shape}-{precision}-{digest}", digest, member, patch, precision)


def _remove_stale(entry: CacheEntry) -> None:
    """Remove the entries of the same member, patch and precision converted from another digest."""
    prefix = entry.folder.name.rsplit("-", 1)[0] + "-"
    for folder in entry.folder.parent.glob(prefix + "*"):
        if folder != entry.folder and folder.is_dir() and not folder.name.startswith("."):
            shutil.rmtree(folder, ignore_errors=True)


def _compile(model_file: Path, precision: str):
    import openvino as ov

    threads = max(1, torch.get_num_threads())
    return ov.Core().compile_model(str(model_file), "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                             "INFERENCE_NUM_THREADS": threads})


def check_agreement(network: torch.nn.Module, converted: ConvertedNetwork, patch_size, in_channels: int,
                    num_prompts: int, windows: int = 2) -> dict:
    """Run a fixed smooth random input (``windows`` patches, every prompt) through the fp32 torch
    network and the converted one; the share of voxels whose thresholded label differs, the largest
    probability difference, and whether the share is at most ``MAX_DISAGREEMENT``."""
    generator = torch.Generator().manual_seed(CHECK_SEED)
    noise = torch.randn(windows, in_channels, *patch_size, generator=generator)
    # structure at several scales, z-scored like the network's input; a 2d model's windows are one
    # slice deep, so the smoothing only spans the axes that have room for it
    kernel = [5 if size >= 5 else 1 for size in patch_size]
    images = torch.nn.functional.avg_pool3d(noise, kernel, stride=1, padding=[k // 2 for k in kernel])
    images = (images - images.mean()) / images.std()
    prompts = torch.arange(num_prompts).expand(windows, -1)
    with torch.no_grad():
        reference = torch.softmax(network(images, prompts).float(), dim=2)[:, :, 1]
        candidate = torch.softmax(converted(images, prompts), dim=2)[:, :, 1]
    disagreement = float(((reference > 0.5) != (candidate > 0.5)).float().mean())
    return {"voxels_disagreeing": disagreement, "max_probability_difference": float((reference - candidate).abs().max()),
            "foreground_share": float((reference > 0.5).float().mean()), "passed": disagreement <= MAX_DISAGREEMENT,
            "limit": MAX_DISAGREEMENT, "windows": windows, "prompts": num_prompts}


def convert(model: FoldModel, in_channels: int, num_prompts: int, precision: str,
            patch_size: list[int] | None = None) -> tuple[ConvertedNetwork, dict]:
    """The model converted for windows of ``patch_size`` (None: its patch) and checked, from the
    cache or converted now and cached (atomically); returns the converted network and its agreement
    record."""
    import openvino as ov

    entry = cache_entry(model, precision, patch_size=patch_size)
    if entry.model_file.is_file() and entry.record_file.is_file():
        record = json.loads(entry.record_file.read_text(encoding="utf-8"))
        return ConvertedNetwork(_compile(entry.model_file, precision), num_prompts, entry.folder, precision), record
    entry.folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{entry.folder.name}.", suffix=".partial", dir=entry.folder.parent))
    try:
        example = (torch.zeros(1, in_channels, *entry.patch_size), torch.zeros(1, 1, dtype=torch.long))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shape checks, which hold for this patch
            converted_model = ov.convert_model(_WholeNetwork(model.network).eval(), example_input=example,
                                               input=[([-1, in_channels, *entry.patch_size], ov.Type.f32),
                                                      ([-1, -1], ov.Type.i64)])
        ov.save_model(converted_model, str(temporary / "model.xml"), compress_to_fp16=False)
        converted = ConvertedNetwork(_compile(temporary / "model.xml", precision), num_prompts, entry.folder, precision)
        record = {**check_agreement(model.network, converted, entry.patch_size, in_channels, num_prompts),
                  "checkpoint": str(model.checkpoint), "digest": entry.digest, "member": entry.member,
                  "patch_size": entry.patch_size, "precision": precision, "openvino": ov.get_version()}
        (temporary / "agreement.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
        _remove_stale(entry)
        if entry.folder.exists():  # another process converted the same model meanwhile: keep its copy
            shutil.rmtree(temporary)
        else:
            os.replace(temporary, entry.folder)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return converted, record  # compiled in memory: it stays valid after its folder is renamed


def use_backend(ensemble: Ensemble, backend: str) -> str:
    """Put every model of ``ensemble`` on ``backend`` (auto, torch, openvino); returns a line that
    says what runs, and why where auto chose.

    Raises:
        InputError: openvino asked for on CUDA, without OpenVINO installed, or for a model that fails
            the agreement check.
    """
    if backend not in BACKENDS:
        raise input_error(f"--backend {backend}", "is unknown", f"use one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "backend torch"
    if ensemble.device.type != "cpu":
        if backend == "openvino":
            raise input_error(f"--backend openvino --device {ensemble.device}", "OpenVINO runs on the CPU here",
                              "use --device cpu, or --backend torch on a GPU")
        return "backend torch (auto: a GPU)"
    if openvino_version() is None:
        if backend == "openvino":
            raise input_error("--backend openvino", "OpenVINO is not installed", INSTALL_HINT)
        return f"backend torch (auto: OpenVINO is not installed; {INSTALL_HINT} for faster CPU prediction)"
    precision = openvino_precision(ensemble.precision)
    converted, records = [], []
    for model in ensemble.models:
        by_patch = {}
        for patch in distinct_patches(model.patch_size, model.dataset_patch_sizes):
            network, record = convert(model, ensemble.in_channels, int(ensemble.plans["num_prompts"]), precision,
                                      patch)
            if not record["passed"]:
                message = (f"disagrees with the torch network on {100 * record['voxels_disagreeing']:.3f} % of the "
                           f"voxels in {precision} (limit {100 * MAX_DISAGREEMENT:.1f} %; "
                           f"{network.folder / 'agreement.json'})")
                if backend == "openvino":
                    raise input_error(model.checkpoint, f"converted by OpenVINO, {message}",
                                      "use --backend torch, or --precision fp32 where bf16 is the cause")
                return f"backend torch (auto: the OpenVINO model of {model.checkpoint} {message})"
            by_patch[tuple(patch)] = network
            records.append(record)
        converted.append(by_patch.popitem()[1] if len(by_patch) == 1 else ConvertedByPatch(by_patch))
    for model, network in zip(ensemble.models, converted):
        model.network = network
    worst = max(r["voxels_disagreeing"] for r in records)
    shapes = f", {len(records)} window shapes" if len(records) > len(converted) else ""
    return (f"backend openvino {openvino_version()} ({precision}; {len(converted)} model(s){shapes}, at most "
            f"{100 * worst:.4f} % of voxels differ from torch fp32 in the agreement check)")
