"""Losses: the method's soft Dice (optionally restricted to a region), Dice + cross-entropy, and
nnU-Net's weighted multi-scale sum for deep supervision."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
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
    """Foreground soft Dice (batch-wise, as nnU-Net's 3d_fullres) + cross-entropy on 2-class logits.

    The background class stays out of the Dice (nnU-Net's ``do_bg=False``, the public code's
    Dice): with it, the easy background Dice would take half of the Dice's gradient.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                               smooth_nr=SMOOTH, smooth_dr=SMOOTH)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, 2, *S), ``target`` (B, 1, *S) with values 0/1."""
        return self.loss(logits.float(), target)

    def dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The foreground soft Dice part alone (methods that weigh Dice and CE apart, e.g. C3S3's score)."""
        return self.loss.dice(logits.float(), target)

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The cross-entropy part alone."""
        return self.loss.ce(logits.float(), target)


def foreground_probability(logits: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the target class from 2-class logits on ``dim=-4`` (B, [K,] 2, Z, Y, X)."""
    return torch.softmax(logits.float(), dim=-4).select(-4, 1)


def deep_supervision_weights(levels: int) -> list[float]:
    """nnU-Net's weights: 1/2^i per level, finest first; the coarsest gets 0; normalised to sum 1."""
    weights = [0.5 ** i for i in range(levels)]
    if levels > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def resize_to(tensor: torch.Tensor, spatial: torch.Size) -> torch.Tensor:
    """A label, mask or probability map (B, C, *S) brought to another grid by nearest neighbour."""
    if tuple(tensor.shape[-3:]) == tuple(spatial):
        return tensor
    return F.interpolate(tensor.float(), size=tuple(spatial), mode="nearest")


def multiscale(loss: Callable[..., torch.Tensor], logits, *full_resolution: torch.Tensor) -> torch.Tensor:
    """``loss(logits, *tensors)``; for deep supervision (a list of logits, finest first) the
    weighted sum over levels, with every tensor resized to the level's grid.

    The coarsest level keeps weight 0 but stays in the graph, so DDP sees every parameter used.
    """
    if torch.is_tensor(logits):
        return loss(logits, *full_resolution)
    total = 0.0
    for weight, level in zip(deep_supervision_weights(len(logits)), logits):
        resized = [resize_to(t, level.shape[-3:]) for t in full_resolution]
        total = total + weight * loss(level, *resized)
    return total


def prompt_columns(logits, columns: torch.Tensor):
    """Sample i's logits of prompt column ``columns[i]`` from (B, K, 2, ...) logits, for the first
    ``len(columns)`` samples: (n, 2, ...) (per level with deep supervision)."""
    rows = torch.arange(columns.shape[0], device=columns.device)
    if torch.is_tensor(logits):
        return logits[rows, columns]
    return [level[rows, columns] for level in logits]


def finest(logits):
    """The full-resolution logits of a network output (a tensor, or a deep-supervision list)."""
    return logits if torch.is_tensor(logits) else logits[0]


def masked_dice_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Foreground soft Dice + cross-entropy counted only where ``weight`` > 0, with voxel weights.

    ``logits`` (B, 2, *S), ``target`` (B, 1, *S) 0/1, ``weight`` (B, 1, *S) >= 0 (a region mask,
    or confidences). Dice: ``1 - (2 sum(w p t) + s) / (sum(w p^2) + sum(w t^2) + s)`` over the
    batch; cross-entropy: the weighted mean. Mixed-image methods score each region of a pasted
    image against the labels of the image it came from; an empty region gives 0.
    """
    logits, target, weight = logits.float(), target.float(), weight.float()
    prob = torch.softmax(logits, dim=1)[:, 1:2]
    intersection = (weight * prob * target).sum()
    denominator = (weight * prob * prob).sum() + (weight * target * target).sum()
    dice = 1 - (2 * intersection + SMOOTH) / (denominator + SMOOTH)
    dice = torch.where(weight.sum() > 0, dice, dice * 0.0)  # nothing to score: 0, the graph kept (DDP)
    cross_entropy = F.cross_entropy(logits, target[:, 0].long(), reduction="none")[:, None]
    return dice + (weight * cross_entropy).sum() / weight.sum().clamp_min(1e-8)


def voxel_contrast(similarity: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """A contrastive loss over the voxels of a batch (C3S3's outcome-driven contrast).

    With ``a_i = m_i s_i / t`` (``s``: the similarity per voxel, e.g. the cosine of two networks'
    features at the same voxel; ``m``: ``positive``, 0/1, same shape) and
    ``D = sum_j exp((1 - m_j) s_j / t)`` over every voxel j, the mean over every voxel i of
    ``-log(exp(a_i) / (exp(a_i) + D))``. A positive's similarity is pulled up; the negatives'
    similarities are pushed down, the most similar ones hardest (they dominate D); a positive
    adds the constant exp(0) = 1 to D. The loss moves smoothly when a voxel changes sides.
    """
    scaled = similarity.float().flatten() / temperature
    chosen = (positive.flatten() > 0.5).float()
    log_d = torch.logsumexp((1 - chosen) * scaled, 0)
    own = chosen * scaled
    return F.softplus(log_d - own).mean()  # -log(e^a / (e^a + D)) = log(1 + D e^-a)


def region_loss(logits_outside: torch.Tensor, target_outside: torch.Tensor, logits_inside: torch.Tensor,
                target_inside: torch.Tensor, inside: torch.Tensor, weight_outside: float = 1.0,
                weight_inside: float = 1.0) -> torch.Tensor:
    """The loss of a pasted image: each region scored against the labels of the image it came from.

    ``logits_outside`` and ``logits_inside`` are the outputs for the prompt of each source image
    (the same tensor when both share a prompt; then this is BCP's mixed loss exactly).
    """
    return (weight_outside * masked_dice_ce(logits_outside, target_outside, 1 - inside)
            + weight_inside * masked_dice_ce(logits_inside, target_inside, inside))


def exclusion_loss(logits: torch.Tensor, absent: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """Structures known to be absent, learnt as absent: after the exclusion loss of Shi et al. (MedIA 2021).

    ``logits`` (B, K, 2, *S) of K prompts; ``absent`` (B, K) 0/1: the prompts whose structure cannot
    occur in sample b (``known_absent``); ``region`` (B, 1, *S) 0/1 or None (the whole image):
    where sample b's own dataset holds (a pasted image mixes two). With ``e`` the excluded voxels
    of each (sample, prompt) and ``p`` its foreground probability, the sum of
    - the exclusion Dice ``2 sum(e p) / (sum(e) + sum(e p))``: the share of the excluded region claimed;
    - the cross-entropy towards background over ``e``: Shi et al. use ``+ sum(e log p)``, which has
      no lower bound; ``-log(1 - p)`` has the same gradient direction and stops at 0.
    0 (graph kept) where nothing is excluded. With independent prompts (one softmax per prompt)
    their marginal loss has no counterpart: an unknown structure already gets no loss.
    """
    weight = absent.float()[(...,) + (None,) * (logits.dim() - 3)]  # (B, K, 1, ...)
    if region is not None:
        weight = weight * region.float()  # (B, 1, *S) -> (B, K, *S)
    weight = weight.expand(*logits.shape[:2], *logits.shape[3:])
    log_probability = torch.log_softmax(logits.float(), dim=2)
    probability = log_probability[:, :, 1].exp()
    excluded = weight.sum()
    claimed = (weight * probability).sum()
    dice = 2 * claimed / (excluded + claimed).clamp_min(SMOOTH)
    cross_entropy = -(weight * log_probability[:, :, 0]).sum() / excluded.clamp_min(1.0)
    return dice + cross_entropy
