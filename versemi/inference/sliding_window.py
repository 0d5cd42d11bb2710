"""The network over a whole image: Gaussian sliding window with mirroring, and the mean over an
ensemble's folds, in fp32 or bf16/fp16 autocast (``inference_dtype``)."""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from ..model.precision import autocast_dtype
from ..preprocessing.pipeline import resize_probabilities  # noqa: F401  (the map back, also named here)
from .models import Ensemble


def inference_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the network for ``precision`` on ``device`` (None: fp32).

    auto: bf16 on CUDA (fp16 on GPUs without bf16) and on CPUs with native bf16 units (AMX,
    AVX512-BF16); fp32 on other CPUs, which only emulate bf16, slowly. Softmax, flips and the
    stitching stay in fp32."""
    return autocast_dtype(precision, True, torch.device(device))


def mirror_axes(mirroring: bool, patch_size=None) -> list[tuple[int, ...]]:
    """Flip combinations of the spatial axes (2, 3, 4) of a (B, C, Z, Y, X) batch: 8 with mirroring,
    else none. An axis the window is one voxel thick along (a 2d model's slice axis) is never
    flipped: that would repeat a pass for nothing (4 combinations in 2d)."""
    if not mirroring:
        return [()]
    spatial = [2 + a for a in range(3) if patch_size is None or int(patch_size[a]) > 1]
    return [axes for n in range(len(spatial) + 1) for axes in itertools.combinations(spatial, n)]


def _is_oom(exc: Exception) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


@torch.no_grad()
def sliding_window_probabilities(network: torch.nn.Module, data: np.ndarray, prompt_index: int | Sequence[int],
                                 patch_size, device: torch.device, step: float = 0.5, mirroring: bool = True,
                                 batch_size: int = 2, *, overlap: float | Sequence[float] | None = None,
                                 blend: str = "gaussian", precision: str = "auto") -> torch.Tensor:
    """Foreground probabilities (Z, Y, X) of one prompt, or (K, Z, Y, X) of a list of K prompts, on
    a preprocessed (C, Z, Y, X) image: Gaussian sliding window, windows ``step`` x patch apart
    (overlap 1 - step), each window averaged over the mirror flips. Every window goes through the
    backbone once for all the prompts. On CUDA the stitched output moves to the CPU if GPU memory
    runs out.

    ``overlap`` (a fraction of the window, one value or one per axis) replaces ``1 - step``;
    ``blend`` "constant" averages overlapping windows with equal weight instead of Gaussian weights.
    ``precision``: see ``inference_dtype``."""
    if not 0 < step <= 1:
        raise ValueError(f"step must lie in (0, 1]; got {step}")
    if blend not in ("gaussian", "constant"):
        raise ValueError(f"blend must be 'gaussian' or 'constant'; got {blend!r}")
    overlap = 1.0 - step if overlap is None else (float(overlap) if np.isscalar(overlap) else [float(o) for o in overlap])
    device = torch.device(device)
    image = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None].to(device)
    single = np.isscalar(prompt_index)
    prompt = torch.tensor([[int(prompt_index)]] if single else [[int(p) for p in prompt_index]], device=device)
    flips = mirror_axes(mirroring, patch_size)
    dtype = inference_dtype(precision, device)

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        prompts = prompt.expand(windows.shape[0], -1)
        total = None
        for axes in flips:
            x = torch.flip(windows, axes) if axes else windows
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
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
                           blend: str = "gaussian", dataset: str | None = None) -> torch.Tensor:
    """The mean over the ensemble's folds of ``sliding_window_probabilities`` (``patch_size`` None:
    each fold's own patch for ``dataset``'s images, the grid ``data`` is on)."""
    total = None
    for model in ensemble.models:
        p = sliding_window_probabilities(model.network, data, prompt_index, patch_size or model.patch_for(dataset),
                                         ensemble.device, step, mirroring, overlap=overlap, blend=blend,
                                         precision=ensemble.precision)
        total = p if total is None else total + p.to(total.device)
    return total / len(ensemble.models)
