"""Evidential deep learning for 2-class segmentation logits: Dirichlet opinions, their fusion, and a
Fisher-information-weighted evidential loss (used by MEDL).

A network's logits become non-negative evidence per class (``softplus`` or ``exp``), the
Dirichlet parameters are ``alpha = evidence + 1`` and their sum ``S``. In subjective-logic terms a
voxel's opinion is the belief ``b_k = evidence_k / S`` per class and the uncertainty ``u = K / S``
(they sum to 1); the expected probability is ``alpha_k / S``. Evidence is monotone in the logit,
so the class with the most evidence is the class with the highest softmax probability:
evidential training does not change what the network predicts with a softmax, only how it is
trained. The class axis is ``dim=-4`` throughout: (B, [P,] 2, Z, Y, X).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EVIDENCE_FUNCTIONS = ("softplus", "exp")
CLASS_AXIS = -4


def dirichlet(logits: torch.Tensor, evidence: str = "softplus") -> torch.Tensor:
    """``alpha = evidence(logits) + 1`` (exp evidence clamped at e^10 against overflow)."""
    logits = logits.float()
    if evidence == "softplus":
        return F.softplus(logits) + 1
    if evidence == "exp":
        return torch.exp(logits.clamp(max=10.0)) + 1
    raise ValueError(f"unknown evidence function {evidence!r}; expected one of {EVIDENCE_FUNCTIONS}")


def opinion(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(belief per class, uncertainty with the class axis kept as size 1) of Dirichlet parameters."""
    strength = alpha.sum(CLASS_AXIS, keepdim=True)
    return (alpha - 1) / strength, alpha.shape[CLASS_AXIS] / strength


def expected_probability(alpha: torch.Tensor) -> torch.Tensor:
    """``alpha_k / S``, the Dirichlet's mean."""
    return alpha / alpha.sum(CLASS_AXIS, keepdim=True)


def discounted(alpha: torch.Tensor, reliability: torch.Tensor) -> torch.Tensor:
    """The Dirichlet with each class's evidence scaled by ``reliability`` (per class, in [0, 1],
    broadcast over the class axis): a source trusted less for a class says less about it, and the
    evidence it loses becomes uncertainty."""
    shape = [1] * alpha.dim()
    shape[CLASS_AXIS] = alpha.shape[CLASS_AXIS]
    return (alpha - 1) * reliability.reshape(shape).to(alpha) + 1


def fuse(alpha_a: torch.Tensor, alpha_b: torch.Tensor) -> torch.Tensor:
    """Dempster's combination of two opinions per voxel (the reduced rule of trusted multi-view
    classification, Han et al., ICLR 2021), returned as Dirichlet parameters.

    With conflict ``C = sum_{i != j} b_a,i b_b,j``: ``b_k = (b_a,k b_b,k + b_a,k u_b + b_b,k u_a) / (1 - C)``
    and ``u = u_a u_b / (1 - C)``. Agreeing opinions reinforce each other (less uncertainty than
    either); a confident opinion prevails over an uncertain one.
    """
    belief_a, uncertainty_a = opinion(alpha_a)
    belief_b, uncertainty_b = opinion(alpha_b)
    agreement = (belief_a * belief_b).sum(CLASS_AXIS, keepdim=True)
    conflict = belief_a.sum(CLASS_AXIS, keepdim=True) * belief_b.sum(CLASS_AXIS, keepdim=True) - agreement
    scale = 1 / (1 - conflict).clamp_min(1e-6)
    belief = (belief_a * belief_b + belief_a * uncertainty_b + belief_b * uncertainty_a) * scale
    uncertainty = uncertainty_a * uncertainty_b * scale
    strength = alpha_a.shape[CLASS_AXIS] / uncertainty
    return belief * strength + 1


def fisher_evidential_loss(alpha: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """The Fisher-information-weighted evidential MSE (I-EDL, Deng et al., ICML 2023), a weighted
    mean over voxels.

    Per voxel ``sum_k ((y_k - p_k)^2 + p_k (1 - p_k) / (S + 1)) * trigamma(alpha_k)`` with
    ``p = alpha / S``: the Dirichlet's expected squared error, each class weighted by its Fisher
    information. A class with little evidence weighs up to 1.64; one with much evidence weighs
    about 1 / alpha, so a class the network is sure of is not over-penalised when its label is
    wrong (a noisy pseudo-label). ``alpha`` (B, 2, *S); ``target`` (B, 1, *S) 0/1 (class 1 where
    1); ``weight`` (B, 1, *S) >= 0 or None (all voxels count the same).
    """
    strength = alpha.sum(1, keepdim=True)
    p = alpha / strength
    y = torch.cat([1 - target, target], 1).float()
    per_class = ((y - p) ** 2 + p * (1 - p) / (strength + 1)) * torch.polygamma(1, alpha)
    per_voxel = per_class.sum(1, keepdim=True)
    if weight is None:
        return per_voxel.mean()
    return (weight * per_voxel).sum() / weight.sum().clamp_min(1e-8)


def asymptotic_weight(uncertainty: torch.Tensor, progress: float) -> torch.Tensor:
    """Voxel weights that move from the reliable voxels to the unreliable ones over training:
    ``(1 - t) (1 - u) + t u`` at progress t in [0, 1]: at first the voxels the fused opinion is
    sure of count, halfway all count alike, at the end the uncertain ones count most."""
    t = min(max(float(progress), 0.0), 1.0)
    return (1 - t) * (1 - uncertainty) + t * uncertainty
