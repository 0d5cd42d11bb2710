"""Implicit semantic augmentation in closed form, for the 2-class generated heads of the prompted
network: the bound of TSA (Li et al., "Transferable Semantic Augmentation for Domain
Adaptation", CVPR 2021, after ISDA, Wang et al., NeurIPS 2019) and the lightweight memory of
class-conditional feature statistics it reads (TransMedSeg).

A feature ``f`` of class ``y`` is augmented as ``f + lambda * shift_y + e`` with ``e ~ N(0, lambda *
covariance_y)`` and classified by a linear layer ``(w_j, b_j)``. The expected cross-entropy over
the augmented features is bounded above (Jensen) by the cross-entropy of the logits

    z_j + lambda (w_j - w_y)^T shift_y + lambda / 2 (w_j - w_y)^T covariance_y (w_j - w_y),

which is what is minimised: no augmented feature is ever drawn. With two classes ``w_j - w_y``
is ``+u`` or ``-u``, ``u = w_1 - w_0``, so the bound costs two small products per sample and prompt.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def class_statistics(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prompt and class, over the voxels of a batch where ``weights`` > 0.

    ``features`` (B, K, F, V), ``labels`` (B, K, V) 0/1, ``weights`` (B, K, V) >= 0. Returns (count
    (K, 2), mean (K, 2, F), covariance (K, 2, F, F)), weighted by ``weights``; a class without voxels
    has count 0, mean and covariance 0.
    """
    features, labels, weights = features.float(), labels.float(), weights.float()
    counts, means, covariances = [], [], []
    for mask in (weights * (1 - labels), weights * labels):
        count = mask.sum((0, 2))  # (K,)
        mean = torch.einsum("bkv,bkfv->kf", mask, features) / count.clamp_min(1e-6)[:, None]
        second = torch.einsum("bkfv,bkgv->kfg", features * mask[:, :, None], features) / count.clamp_min(1e-6)[:, None, None]
        covariance = (second - mean[:, :, None] * mean[:, None, :]) * (count > 0)[:, None, None]
        counts.append(count)
        means.append(mean)
        covariances.append(covariance)
    return torch.stack(counts, 1), torch.stack(means, 1), torch.stack(covariances, 1)


class FeatureMemory:
    """Running class-conditional mean and covariance of one network's head features, per prompt:
    ``(1 - momentum) * memory + momentum * batch`` for each (prompt, class) with at least
    ``min_voxels`` voxels in the batch; the first such batch sets it."""

    def __init__(self, prompts: int, channels: int, momentum: float, min_voxels: int = 16,
                 device: torch.device | str = "cpu") -> None:
        self.momentum, self.min_voxels = momentum, min_voxels
        self.mean = torch.zeros(prompts, 2, channels, device=device)
        self.covariance = torch.zeros(prompts, 2, channels, channels, device=device)
        self.seen = torch.zeros(prompts, 2, dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        """Fold in a batch (``class_statistics``'s arguments)."""
        count, mean, covariance = class_statistics(features, labels, weights)
        enough = count >= self.min_voxels
        rate = torch.where(self.seen, torch.full_like(count, self.momentum), torch.ones_like(count)) * enough
        self.mean += rate[..., None] * (mean - self.mean)
        self.covariance += rate[..., None, None] * (covariance - self.covariance)
        self.seen |= enough

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.clone(), "covariance": self.covariance.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in ("mean", "covariance", "seen"):
            getattr(self, name).copy_(state[name])


def augmented_logits(logits: torch.Tensor, classifier_difference: torch.Tensor, labels: torch.Tensor,
                     shift: torch.Tensor, covariance: torch.Tensor, strength: float) -> torch.Tensor:
    """The logits whose cross-entropy bounds the expected one over the augmented features.

    ``logits`` (B, K, 2, *S); ``classifier_difference`` (B, K, F): ``u = w_1 - w_0`` of each sample's
    and prompt's final linear layer; ``labels`` (B, K, *S) 0/1; ``shift`` (K, 2, F) and ``covariance``
    (K, 2, F, F) per prompt and class; ``strength`` lambda >= 0. The logit of the class other than
    the label gets ``lambda s u^T shift_y + lambda / 2 u^T covariance_y u`` (s = +1 for label 0, -1 for
    label 1); the label's own logit is unchanged.
    """
    u = classifier_difference.float()
    along = torch.einsum("bkf,kcf->bkc", u, shift.float())  # (B, K, 2)
    spread = torch.einsum("bkf,kcfg,bkg->bkc", u, covariance.float(), u)
    y = labels.float()
    voxel = (1,) * (y.dim() - 2)

    def at_label(per_class: torch.Tensor) -> torch.Tensor:
        """(B, K, 2) -> (B, K, *S): each voxel's value for its label's class."""
        first, second = (per_class[..., c].view(*per_class.shape[:2], *voxel) for c in (0, 1))
        return first + y * (second - first)

    term = strength * ((1 - 2 * y) * at_label(along) + 0.5 * at_label(spread))
    return logits.float() + torch.stack([y * term, (1 - y) * term], dim=2)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean cross-entropy of (B, K, 2, *S) logits against (B, K, *S) 0/1 labels; 0 where
    no weight is left."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.long().flatten(0, 1), reduction="none")
    weights = weights.float().flatten(0, 1)
    return (weights * loss).sum() / weights.sum().clamp_min(1.0)
