"""Which mixed precision a network computes in, training or predicting: bf16 where the hardware
has bf16 units, else fp32.

On a CPU with AMX or AVX512-BF16, ``torch.autocast("cpu", dtype=torch.bfloat16)`` made a 3D
U-Net training step 2.1x faster (benchmarks/RESULTS.md); CPUs without them emulate bf16 slowly,
so there ``auto`` stays in fp32. CUDA gets bf16, or fp16 with loss scaling on GPUs without bf16.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..errors import input_error

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when /proc/cpuinfo lists a native bf16 instruction set (AMX or AVX512-BF16)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def autocast_dtype(precision: str, amp: bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (auto/bf16/fp16/fp32) on ``device``; None means fp32."""
    if not amp or precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise input_error("--precision fp16", "float16 autocast needs a CUDA device",
                              "use --precision bf16 or fp32 on a CPU")
        return torch.float16
    if precision != "auto":
        raise input_error(f"--precision {precision}", "unknown precision", "use auto, bf16, fp16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
