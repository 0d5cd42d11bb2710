"""CutMix boxes ("context masks") and mixing, with the real patch size.

A box's side along each axis is ``ratio * patch side``, placed uniformly inside the patch (the
public code hard-codes a 96-voxel patch here; the actual patch size is used instead).
"""
from __future__ import annotations

import torch


def box_mask(batch: int, patch_size, ratio: float, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, 1, Z, Y, X) float mask, 1 inside each sample's own random box."""
    mask = torch.zeros((batch, 1, *patch_size), device=device)
    for b in range(batch):
        region = [slice(None), slice(None)]
        for side in patch_size:
            length = max(1, int(round(side * ratio)))
            start = int(torch.randint(0, side - length + 1, (1,), generator=generator))
            region.append(slice(start, start + length))
        region[0] = b
        mask[tuple(region)] = 1
    return mask


def mix(outside: torch.Tensor, inside: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``outside`` where the mask is 0, ``inside`` where it is 1 (masks broadcast over channels)."""
    return outside * (1 - mask) + inside * mask
