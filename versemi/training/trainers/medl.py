"""MEDL: mutual evidential deep learning (He, Bi, Li, Pun, Jiao and Jin, "Mutual Evidential Deep
Learning for Medical Image Segmentation", 2025, arXiv 2505.12418; 91.55 Dice reported on LA with
8 labeled cases). There is no public code: this trainer follows the method as the paper's
abstract states it, and every detail below that the abstract leaves open is this
implementation's choice.

What the abstract states, and how it is built here:
- "networks with different architectures generate complementary evidence for unlabeled samples":
  the plan's U-Net (``unet``, the main network) and the V-Net (``vnet``), both prompt-conditioned
  (``training.architectures``, as C3S3Trainer), each read as a Dirichlet per voxel: evidence =
  softplus(logits) (``evidence: "exp"`` for exp), alpha = evidence + 1 (``training.evidential``);
- "an improved class-aware evidential fusion" of the two: each network's evidence for a class is
  first discounted by its reliability for that class, its soft Dice for the class (foreground and
  background) on the step's labeled samples relative to the better network's (the better one
  keeps all its evidence); the two opinions are then combined with Dempster's rule (the reduced
  rule of trusted multi-view classification). The fused class with the most belief is the
  pseudo-label, the fused uncertainty u = 2 / S says how reliable it is;
- "an asymptotic Fisher information-based evidential learning strategy" on the unlabeled
  samples: each network's Dirichlet is trained towards the fused pseudo-labels with the
  Fisher-information-weighted evidential MSE of I-EDL (Deng et al., ICML 2023: classes with much
  evidence weigh less, so a wrong pseudo-label on a class a network is sure of is not
  over-penalised), each voxel weighted by ``(1 - t) (1 - u) + t u`` at training progress t: first
  the reliable voxels, halfway all alike, at the end the unreliable ones most;
- "for labeled data ... an uncertainty-driven asymptotic learning strategy ... focus on
  challenging voxels": besides Dice + CE on the logits, each network's Dirichlet gets the same
  Fisher evidential loss against the labels, each voxel weighted by ``1 + t u`` with its own
  (detached) uncertainty u: uniform at first, the uncertain voxels up to twice as much at the end.

Further choices (the abstract gives no numbers):
- the unlabeled term is weighted ``weight_unlabeled`` (1.0) times a sigmoid ramp-up over the
  first ``rampup_fraction`` (0.25) of the epochs; the labeled evidential term ``weight_evidential``
  (1.0); neither I-EDL's log-determinant term nor EDL's KL term on misleading evidence (Dice + CE
  on the logits trains that evidence down);
- reliability and fusion use the full-resolution output of the step's batch; fusion and targets
  are detached (targets, not paths for gradients); the two networks are trained alike
  (mutually), each by the fused pseudo-labels;
- prediction uses each network's softmax (the class with the most evidence is the softmax's
  argmax) and averages the two networks (``--member`` picks one);
- voxels, not whole samples, are weighted by reliability;
- several datasets: each unlabeled sample is asked one prompt drawn among its own dataset's
  (``DatasetPrompts``), the same for both networks;
- optimizers, LR schedule and the rest of the loop are the trainer's (one optimizer per network);
  with deep supervision, Dice + CE is nnU-Net's weighted sum over the resolutions.
The ``paper`` preset is these defaults.
"""
from __future__ import annotations

import torch

from ...errors import input_error
from ..evidential import (EVIDENCE_FUNCTIONS, asymptotic_weight, dirichlet, discounted, expected_probability, fuse,
                          fisher_evidential_loss, opinion)
from ..losses import SMOOTH, finest, multiscale
from ..prompts import DatasetPrompts
from ..schedules import sigmoid_rampup
from ..trainer import Trainer

DEFAULTS = {
    "evidence": "softplus",        # or "exp"
    "weight_evidential": 1.0,      # labeled Fisher evidential term (besides Dice + CE)
    "weight_unlabeled": 1.0,       # unlabeled Fisher evidential term towards the fused pseudo-labels
    "rampup_fraction": 0.25,       # sigmoid ramp-up of weight_unlabeled over this share of the epochs
    "second_architecture": "auto",  # the V-Net where the patch allows, else "unet" (training.architectures)
    "second_base_features": 16,    # the V-Net's first-stage width
}
PRESETS = {"paper": dict(DEFAULTS)}


def class_reliability(alpha: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(2,) soft Dice of the expected probabilities per class (background, foreground) against 0/1
    ``target`` (B, 1, *S), over the batch."""
    probability = expected_probability(alpha)
    truth = torch.cat([1 - target, target], 1).float()
    dims = [0] + list(range(2, alpha.dim()))
    return (2 * (probability * truth).sum(dims) + SMOOTH) / (probability.sum(dims) + truth.sum(dims) + SMOOTH)


def class_aware_fusion(alpha_a: torch.Tensor, alpha_b: torch.Tensor, reliability_a: torch.Tensor,
                       reliability_b: torch.Tensor) -> torch.Tensor:
    """The two networks' Dirichlets (B, 2, *S) fused after each class's evidence is discounted by
    the network's reliability for it relative to the better network's."""
    best = torch.maximum(reliability_a, reliability_b).clamp_min(1e-6)
    return fuse(discounted(alpha_a, reliability_a / best), discounted(alpha_b, reliability_b / best))


class MEDLTrainer(Trainer):
    uses_unlabeled = True
    network_name = "unet"
    method_defaults = DEFAULTS
    method_presets = PRESETS

    def on_train_start(self) -> None:
        s = self.settings
        if s["evidence"] not in EVIDENCE_FUNCTIONS:
            raise input_error("--method", f"evidence {s['evidence']!r} is unknown",
                              f"use one of {', '.join(EVIDENCE_FUNCTIONS)}")
        for key in ("weight_evidential", "weight_unlabeled"):
            if s[key] < 0:
                raise input_error("--method", f"{key} {s[key]} is negative",
                                  f"give {key} >= 0 (default {DEFAULTS[key]})")
        if not s["rampup_fraction"] > 0:
            raise input_error("--method", f"rampup_fraction {s['rampup_fraction']} is not positive",
                              f"give rampup_fraction > 0 (default {DEFAULTS['rampup_fraction']})")
        self.second = self.add_second_network(s["second_architecture"], s["second_base_features"])
        self.dataset_prompts = DatasetPrompts(self.plans, self.device)

    @property
    def progress(self) -> float:
        """0 at the first epoch, towards 1 at the last."""
        return self.method_epoch / max(1, self.method_epochs)

    def unlabeled_weight(self) -> float:
        s = self.settings
        return s["weight_unlabeled"] * sigmoid_rampup(self.method_epoch / max(1e-8, s["rampup_fraction"] * self.method_epochs))

    def train_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        s = self.settings
        n_labeled = labeled["data"].shape[0]
        x, prompts = labeled["data"], labeled["prompt"]
        if unlabeled is not None:
            x = torch.cat([x, unlabeled["data"]])
            prompts = torch.cat([prompts, self.dataset_prompts.draw(unlabeled["dataset"])])
        target = labeled["target"]
        outputs = [network(x, prompts) for network in (self.network, self.second)]  # one forward each (DDP)
        alphas = [dirichlet(finest(out), s["evidence"]) for out in outputs]
        t = self.progress
        terms: dict[str, torch.Tensor] = {"supervised": 0.0, "evidential": 0.0}
        for out, alpha in zip(outputs, alphas):
            own = out[:n_labeled] if torch.is_tensor(out) else [level[:n_labeled] for level in out]
            terms["supervised"] = terms["supervised"] + multiscale(self.loss, own, target)
            _, uncertainty = opinion(alpha[:n_labeled].detach())
            terms["evidential"] = terms["evidential"] + s["weight_evidential"] * fisher_evidential_loss(
                alpha[:n_labeled], target, 1 + t * uncertainty)
        if unlabeled is not None:
            with torch.no_grad():
                reliability = [class_reliability(alpha[:n_labeled], target) for alpha in alphas]
                fused = class_aware_fusion(alphas[0][n_labeled:], alphas[1][n_labeled:], *reliability)
                belief, uncertainty = opinion(fused)
                pseudo = belief.argmax(1, keepdim=True).float()
                weight = asymptotic_weight(uncertainty, t)
            terms["unlabeled"] = self.unlabeled_weight() * sum(
                fisher_evidential_loss(alpha[n_labeled:], pseudo, weight) for alpha in alphas)
            terms["fused_uncertainty"] = uncertainty.mean()  # logged, not optimized
        terms["loss"] = sum(value for key, value in terms.items() if key != "fused_uncertainty")
        return terms
