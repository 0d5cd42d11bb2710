"""Losses: the method's soft Dice (optionally restricted to a region) and Dice + cross-entropy."""
from __future__ import annotations

import torch
from monai.losses import DiceCELoss

SMOOTH = 1e-5


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - (2 sum(p t) + s) / (sum(p p) + sum(t t) + s)`` over the whole batch (VerSemi's loss).

    ``weight`` (same shape, 0/1) restricts the sums to a region, e.g. where a label is known.
    """
    if weight is not None:
        prob, target = prob * weight, target * weight
    intersection = (prob * target).sum()
    return 1 - (2 * intersection + SMOOTH) / ((prob * prob).sum() + (target * target).sum() + SMOOTH)


class DiceCE(torch.nn.Module):
    """Soft Dice (batch-wise, as nnU-Net's 3d_fullres) + cross-entropy on 2-class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, smooth_nr=SMOOTH, smooth_dr=SMOOTH)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, 2, *S), ``target`` (B, 1, *S) with values 0/1."""
        return self.loss(logits.float(), target)


def foreground_probability(logits: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the target class from 2-class logits on ``dim=-4`` (B, [K,] 2, Z, Y, X)."""
    return torch.softmax(logits.float(), dim=-4).select(-4, 1)
