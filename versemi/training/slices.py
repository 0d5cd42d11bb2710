"""A 2d network over 3d patches, slice by slice, and its output back in the volume's layout.

The 2d network takes one slice per row, ``(B, C, 1, Y, X)``; a 3d patch ``(B, C, Z, Y, X)`` becomes
``B * Z`` such rows (slice z of sample b at row ``b * Z + z``), padded in-plane to the 2d network's
divisor, and the logits come back as ``(B, [K,] 2, Z, Y, X)`` with every slice where it was taken
from: pseudo-masks pass between a 2d and a 3d network voxel for voxel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def through_slices(network: torch.nn.Module, volumes: torch.Tensor, prompts: torch.Tensor,
                   divisor: tuple[int, int, int]) -> torch.Tensor:
    """Logits of the 2d ``network`` on every z slice of ``volumes`` (B, C, Z, Y, X), asked
    ``prompts`` (B,) or (B, K) on each of a sample's slices: (B, 2, Z, Y, X) or (B, K, 2, Z, Y, X)."""
    batch, channels, depth, height, width = volumes.shape
    pad_y, pad_x = (-height) % divisor[1], (-width) % divisor[2]
    rows = volumes.permute(0, 2, 1, 3, 4).reshape(batch * depth, channels, 1, height, width)
    if pad_y or pad_x:
        rows = F.pad(rows, (0, pad_x, 0, pad_y))
    logits = network(rows, prompts.repeat_interleave(depth, dim=0))
    if not torch.is_tensor(logits):  # deep supervision: the full-resolution output
        logits = logits[0]
    logits = logits[..., 0, :height, :width]  # (B * Z, [K,] 2, Y, X)
    logits = logits.reshape(batch, depth, *logits.shape[1:])
    return logits.movedim(1, -3)  # the slice axis back before (Y, X)
