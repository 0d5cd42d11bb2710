"""3D convolutions whose bf16 weight gradient a CPU gets wrong run in fp32 instead.

PyTorch 2.13's oneDNN bf16 kernel for the weight gradient of a stride-1 3D convolution returns
wrong values when the input is shallow along its first spatial axis, sometimes reading memory it
never wrote, so two identical runs differ and NaNs appear. The forward pass and the input
gradient are right. Measured on an AMD EPYC with AVX512-BF16, from 16 channels on
(``benchmarks/bf16_conv_check.py``): kernel 3 is wrong at depth 2 and right at depths 1 and 3 to
8 whatever the other extents; kernel 5 is wrong at every depth tried (1 to 12, and up to 32 at
height 1); kernel 1 and strided kernel 3 were right. A network meets kernel 3 at depth 2 at its
coarsest level (a patch 16 deep after three poolings), and there training reached NaN.

So under CPU bf16 autocast a stride-1 convolution computes in fp32 when its kernel is 3 deep and
its input at most 2 deep, or its kernel is deeper than 3 (never built here; wrong at too many
shapes to list). At such depths it is cheap; deeper inputs keep bf16, where it was measured right
(fp32 at depth 5 made a training step of the hippocampus network 18 % slower).
"""
from __future__ import annotations

import torch
from torch import nn


def needs_fp32(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    """True where bf16 autocast on the CPU would give this convolution a wrong weight gradient."""
    kernel_depth, stride_depth = conv.kernel_size[0], conv.stride[0]
    shallow = kernel_depth > 3 or (kernel_depth > 1 and x.dim() == 5 and x.shape[2] <= 2)
    return (shallow and stride_depth == 1 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


class GuardedConv3d(nn.Conv3d):
    """An ``nn.Conv3d`` that leaves CPU bf16 autocast at the depths where its weight gradient is wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_fp32(self, x):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def guard_bf16_convolutions(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Conv3d`` in ``module`` a ``GuardedConv3d`` in place (same parameters and
    state dict: only the class changes, so MONAI's blocks need no rebuild); returns ``module``."""
    for layer in module.modules():
        if type(layer) is nn.Conv3d:
            layer.__class__ = GuardedConv3d
    return module
