"""Mixing images and what is known of them: CutMix boxes, block masks, copy-paste both ways.

A box's side along each axis is ``ratio * patch side``, placed uniformly inside the patch (the
public VerSemi and BCP code hard-code their patch size here; the actual patch size is used).

``Regions`` is a batch of images assembled from pieces of others. Each piece keeps a slot: the
prompt to ask for it, its target and where that target holds. The loss scores every slot only
on its own piece, with the prompt of the dataset it came from, so a labeled LA patch pasted into
an unlabeled spleen CT is scored with the LA prompt inside the box and the spleen prompt outside.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .losses import masked_dice_ce, multiscale


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


def block_mask(batch: int, patch_size, blocks_per_axis: int, ratio: float, device: torch.device | str = "cpu"
               ) -> torch.Tensor:
    """(B, 1, Z, Y, X) float mask: the patch cut into ``blocks_per_axis`` blocks along each axis, a
    random ``ratio`` of them (per sample, the torch generator) set to 1 (M3HL's masked-image-modelling
    masks). An axis one voxel thick (a 2d patch's slice axis) is one block: 2d patches get
    ``blocks_per_axis``^2 blocks."""
    per_axis = [1 if side == 1 else blocks_per_axis for side in patch_size]
    count = per_axis[0] * per_axis[1] * per_axis[2]
    chosen = round(ratio * count)
    edges = [[round(i * side / n) for i in range(n + 1)] for side, n in zip(patch_size, per_axis)]
    mask = torch.zeros((batch, 1, *patch_size), device=device)
    for b in range(batch):
        for block in torch.randperm(count)[:chosen].tolist():
            z, y, x = block // (per_axis[1] * per_axis[2]), (block // per_axis[2]) % per_axis[1], block % per_axis[2]
            mask[b, 0, edges[0][z]:edges[0][z + 1], edges[1][y]:edges[1][y + 1], edges[2][x]:edges[2][x + 1]] = 1
    return mask


def shuffled(batch: dict) -> dict:
    """The batch's samples in a random order from the (seeded) torch generator. The loader puts
    its foreground-centred patches last: split unshuffled into halves, one half would always be
    the foreground one."""
    size = batch["data"].shape[0]
    order = torch.randperm(size)
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == size:
            out[key] = value[order.to(value.device)]
        elif isinstance(value, list) and len(value) == size:
            out[key] = [value[i] for i in order.tolist()]
        else:
            out[key] = value
    return out


@dataclass
class Regions:
    """Images made of pieces, with one slot per piece: ``prompts`` (B, S) to ask, ``targets``
    (B, S, *S) and ``masks`` (B, S, *S, 0/1: where the slot's target holds), ``scales`` (S,) loss
    weights, and ``confidence`` (B, 1, *S) of the targets (1 where a label is known)."""

    images: torch.Tensor
    prompts: torch.Tensor
    targets: torch.Tensor
    masks: torch.Tensor
    scales: tuple[float, ...]
    confidence: torch.Tensor

    @classmethod
    def whole(cls, images: torch.Tensor, prompts: torch.Tensor, targets: torch.Tensor, scale: float = 1.0,
              confidence: torch.Tensor | None = None) -> "Regions":
        """Unmixed images: one slot, the target known everywhere (labels, or pseudo-labels)."""
        return cls(images, prompts[:, None], targets, torch.ones_like(targets), (scale,),
                   torch.ones_like(targets) if confidence is None else confidence)

    def rows(self, index) -> "Regions":
        return Regions(self.images[index], self.prompts[index], self.targets[index], self.masks[index], self.scales,
                       self.confidence[index])

    def paste(self, other: "Regions", inside: torch.Tensor) -> "Regions":
        """``other`` pasted into these images where ``inside`` (B, 1, *S) is 1: the slots of both,
        each restricted to the voxels it still covers."""
        return Regions(mix(self.images, other.images, inside), torch.cat([self.prompts, other.prompts], 1),
                       torch.cat([self.targets, other.targets], 1),
                       torch.cat([self.masks * (1 - inside), other.masks * inside], 1), self.scales + other.scales,
                       mix(self.confidence, other.confidence, inside))

    def weighted(self, factor: float) -> "Regions":
        """The same slots with their loss weights multiplied by ``factor``."""
        return Regions(self.images, self.prompts, self.targets, self.masks,
                       tuple(factor * scale for scale in self.scales), self.confidence)

    def shifted(self, offsets: list[tuple[int, int, int]]) -> "Regions":
        """Every tensor of row b rolled by ``offsets[b]`` voxels (to move a box to another place)."""
        def roll(tensor):
            return torch.stack([torch.roll(t, shifts=o, dims=(-3, -2, -1)) for t, o in zip(tensor, offsets)])
        return Regions(roll(self.images), self.prompts, roll(self.targets), roll(self.masks), self.scales,
                       roll(self.confidence))

    def loss(self, logits) -> torch.Tensor:
        """Sum over slots of scale x masked Dice + CE of the slot's prompt on its piece. ``logits``:
        (B, S, 2, *S), or a deep-supervision list of them (targets resized per level)."""
        def per_level(level, targets, masks):
            return sum(scale * masked_dice_ce(level[:, s], targets[:, s:s + 1], masks[:, s:s + 1])
                       for s, scale in enumerate(self.scales))
        return multiscale(per_level, logits, self.targets, self.masks)
