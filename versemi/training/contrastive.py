"""Supervised contrastive learning on meta-labels, with self-paced weights (Peng et al., "Self-paced
contrastive learning for semi-supervised medical image segmentation with meta-labels", NeurIPS
2021; public code jizongFox/Self-paced-Contrastive-Learning, ``SelfPacedSupConLoss``).

Two views of N images give 2N unit feature vectors. Two rows are a positive pair when their
images share a meta-label (the same scan, or the same band of slice positions), the same image's
two views included; every other row is a negative. Each row's loss is the mean over its
positives of ``-log(exp(s_ij / t) / sum_k exp(s_ik / t))`` (k over every other row). Meta-labels
are weak: two slices of one band can look unalike. The self-paced weight of a positive pair
with loss ``l_ij`` is, ``soft``, ``max(0, 1 - l_ij / gamma)`` (or, ``hard``, ``l_ij <= gamma``), so the
pairs that are hard to pull together count less while ``gamma`` is small; ``gamma`` grows during
training (``self_paced_gamma``), until every pair counts.
"""
from __future__ import annotations

import torch

SELF_PACED_MODES = ("soft", "hard")


def same_label(labels: torch.Tensor) -> torch.Tensor:
    """(N, N) 0/1: which samples share the meta-label."""
    return (labels[:, None] == labels[None, :]).float()


def position_bands(position: torch.Tensor, bands: int) -> torch.Tensor:
    """(N,) the band (0 .. bands - 1) of each relative slice position in [0, 1]."""
    return torch.clamp((position * bands).long(), 0, bands - 1)


def self_paced_gamma(progress: float, begin: float, end: float, power: float = 0.5) -> float:
    """``gamma`` at ``progress`` (0 .. 1) of its schedule: begin + (end - begin) progress^power."""
    return begin + (end - begin) * min(1.0, max(0.0, progress)) ** power


def self_paced_contrast(first: torch.Tensor, second: torch.Tensor, positives: torch.Tensor, temperature: float,
                        gamma: float | None = None, mode: str = "soft") -> tuple[torch.Tensor, float]:
    """(loss, share of positive pairs' weight kept) of two views ``first``/``second`` (N, D) unit
    vectors with ``positives`` (N, N) 0/1 between their images; ``gamma`` None: every pair counts."""
    if mode not in SELF_PACED_MODES:
        raise ValueError(f"mode must be one of {SELF_PACED_MODES}; got {mode!r}")
    rows = first.shape[0] * 2
    features = torch.cat([first, second]).float()
    others = 1 - torch.eye(rows, device=features.device)
    positive = positives.repeat(2, 2) * others
    logits = features @ features.T / temperature
    logits = logits - logits.detach().max()
    log_share = logits - torch.log((torch.exp(logits) * others).sum(1, keepdim=True) + 1e-16)
    weight = torch.ones_like(positive)
    if gamma is not None:
        with torch.no_grad():
            loss_ij = -log_share
            weight = (loss_ij <= gamma).float() if mode == "hard" else torch.clamp(1 - loss_ij / gamma, min=0)
    kept = float((weight * positive).sum() / positive.sum().clamp_min(1))
    per_row = (log_share * weight * positive).sum(1) / positive.sum(1).clamp_min(1)
    return -per_row.mean(), kept
