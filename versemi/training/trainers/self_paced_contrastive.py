"""Self-paced contrastive learning with meta-labels (Peng, Wang, Pedersoli, Desrosiers, "Self-paced
contrastive learning for semi-supervised medical image segmentation with meta-labels", NeurIPS
2021; public code jizongFox/Self-paced-Contrastive-Learning). Made for the 2d configuration
(slices of 3d scans); it runs in 3d too, where the position is that of the patch's centre.

Meta-labels come for free from the pipeline (``training.data``): the relative position along z
of each patch in its scan (0 .. 1, cut into ``position_bands`` bands) and the scan itself. Two
images sharing a meta-label are a positive pair of a supervised contrastive loss on the
encoder's global feature (the bottleneck, averaged over space, through a projection head), two
views of each image (the loader's augmented patch, and a flipped, noisier copy of it). The
self-paced weights (``training.contrastive``) let the pairs that are hard to pull together
(weak labels that are noise: two slices of one band that look unalike) count less at first;
``gamma`` grows from ``gamma_begin`` to ``gamma_end`` as (t / T)^0.5 over each stage.

- Stage 1 (``pretrain_fraction`` of the method's epochs): encoder pre-training on every image,
  labeled and unlabeled, with the contrastive loss alone (the mean over ``meta_labels``). A run
  with ``pretrain_fraction`` 1 is the pre-training alone; ``--init-from`` its checkpoint starts
  any trainer from it, and this trainer then skips its stage 1.
- Stage 2: the supervised loss on the labeled batch plus ``weight_contrast`` x the same
  self-paced contrastive loss on the unlabeled batch (one forward for both).

The shared supervised warm-up (``--supervised-warm-up auto``) is not applied: the pre-training
comes first by design, and a supervised model would only be pulled away by it. An explicit share
is honoured.

Choices the text leaves open, decided here:
- the global feature is the U-Net's bottleneck (the paper's encoder output), pooled over space;
  the projection head is Linear-ReLU-Linear to ``projector_dim``, normalized (as the public
  code's ``ProjectionHead``), trained with the network and used in training only;
- the second view: a random in-plane mirror and Gaussian noise and a contrast change of the
  loader's patch (the paper's transforms are affine ones of the image);
- meta-labels are combined by averaging one loss per meta-label (the paper weighs the losses of
  its ablation; the public code runs one hook per meta-label, each with its own weight);
- ``gamma`` runs from 2 to 20 (losses ``l_ij`` are a few units at a batch of tens): the public
  code's default 1e6 switches the self-paced weights off; the paper's values are not given in
  its text read here;
- the paper pre-trains, then fine-tunes on the labeled scans; stage 2 keeps the contrastive term
  on unlabeled images, so the method stays semi-supervised after the pre-training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import input_error
from ..contrastive import SELF_PACED_MODES, position_bands, same_label, self_paced_contrast, self_paced_gamma
from ..feature_taps import BackboneTap
from ..losses import multiscale
from ..prompts import DatasetPrompts
from ..trainer import Trainer
from ..warm_up import AUTO

META_LABELS = ("position", "scan")
DEFAULTS = {
    "pretrain_fraction": 0.5,     # share of the method's epochs of stage 1, the contrastive pre-training
    "meta_labels": ["position", "scan"],
    "position_bands": 4,          # the relative slice position cut into this many bands
    "temperature": 0.07,
    "projector_dim": 128,
    "projector_hidden": 256,
    "self_paced": "soft",         # or "hard"
    "gamma_begin": 2.0,
    "gamma_end": 20.0,
    "weight_contrast": 0.1,       # stage 2: the unlabeled contrastive term beside the supervised loss
    "view_noise": 0.1,            # the second view: Gaussian noise of this std (z-scored images) ...
    "view_contrast": 0.1,         # ... and intensities scaled by 1 +- this
}
PRESETS = {"paper": dict(DEFAULTS)}


def projection_head(channels: int, hidden: int, dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


class SelfPacedContrastiveTrainer(Trainer):
    """Stage 1 contrastive pre-training on meta-labels, stage 2 supervised + self-paced
    contrastive on unlabeled images (module docstring)."""

    uses_unlabeled = True
    method_defaults = DEFAULTS
    method_presets = PRESETS
    warm_up_setting = "pretrain_fraction"  # a warm start (e.g. from a pre-training run) replaces stage 1

    def __init__(self, plans, plans_root, configuration, fold, output_folder, config, device="cpu"):
        if config.supervised_warm_up == AUTO and config.warm_up_epochs is None:
            config.supervised_warm_up = "0"  # the pre-training comes first (module docstring)
        super().__init__(plans, plans_root, configuration, fold, output_folder, config, device)

    def on_train_start(self) -> None:
        s = self.settings
        unknown = [m for m in s["meta_labels"] if m not in META_LABELS] if isinstance(s["meta_labels"], list) else [0]
        if unknown or not s["meta_labels"]:
            raise input_error("--method", f"meta_labels {s['meta_labels']!r} is not a non-empty list of "
                                          f"{', '.join(META_LABELS)}", 'e.g. "meta_labels": ["position", "scan"]')
        if s["self_paced"] not in SELF_PACED_MODES:
            raise input_error("--method", f"self_paced {s['self_paced']!r} is unknown",
                              f"use one of {', '.join(SELF_PACED_MODES)}")
        if not 0 <= s["pretrain_fraction"] <= 1:
            raise input_error("--method", f"pretrain_fraction {s['pretrain_fraction']} is not in [0, 1]",
                              "give the share of the method's epochs to pre-train, e.g. 0.5")
        for key in ("position_bands", "projector_dim", "projector_hidden"):
            if not (isinstance(s[key], int) and s[key] >= 1):
                raise input_error("--method", f"{key} {s[key]!r} is not a positive whole number",
                                  f"give {key} as a count (default {DEFAULTS[key]})")
        channels = self.model.backbone.bottleneck_channels
        self.projector = self.add_network("projector", module=projection_head(channels, s["projector_hidden"],
                                                                              s["projector_dim"]))
        self.dataset_prompts = DatasetPrompts(self.plans, self.device)

    def pretrain_epochs(self) -> int:
        return round(self.settings["pretrain_fraction"] * self.method_epochs)

    def stage_starts(self) -> list[int]:
        return [self.pretrain_epochs()]

    def gamma(self) -> float:
        """``gamma`` of the current stage, from its first epoch (0) to its last (1)."""
        s, first = self.settings, self.pretrain_epochs()
        start, length = (0, first) if self.stage == 1 else (first, self.method_epochs - first)
        progress = (self.method_epoch - start) / max(1, length - 1)
        return self_paced_gamma(progress, s["gamma_begin"], s["gamma_end"])

    def second_view(self, images: torch.Tensor) -> torch.Tensor:
        """A mirrored (along y or x, per sample), noisier copy of each image."""
        s = self.settings
        shape = (images.shape[0],) + (1,) * (images.dim() - 1)
        axis = torch.randint(0, 2, (images.shape[0],), device=images.device)
        flipped = torch.where((axis == 0).view(shape), images.flip(-2), images.flip(-1))
        scale = 1 + s["view_contrast"] * (2 * torch.rand(shape, device=images.device) - 1)
        return flipped * scale + s["view_noise"] * torch.randn_like(images)

    def contrast(self, bottleneck: torch.Tensor, batch_parts: list[dict]) -> tuple[torch.Tensor, float]:
        """The mean over the meta-labels of the self-paced contrastive loss of two views (the
        bottleneck's rows: every image of ``batch_parts``, then their second views)."""
        s = self.settings
        pooled = bottleneck.float().mean(dim=tuple(range(2, bottleneck.dim())))
        first, second = F.normalize(self.projector(pooled), dim=1).chunk(2)
        labels = {"position": position_bands(torch.cat([p["position"] for p in batch_parts]), s["position_bands"]),
                  "scan": torch.cat([p["scan"] for p in batch_parts])}
        losses, kept = [], []
        for meta in s["meta_labels"]:
            loss, share = self_paced_contrast(first, second, same_label(labels[meta].to(first.device)),
                                              s["temperature"], self.gamma(), s["self_paced"])
            losses.append(loss)
            kept.append(share)
        return sum(losses) / len(losses), sum(kept) / len(kept)

    def train_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        n = labeled["data"].shape[0]
        if self.stage == 1:  # every image, no labels
            parts = [labeled] + ([unlabeled] if unlabeled is not None else [])
            images = torch.cat([p["data"] for p in parts])
            prompts = torch.cat([labeled["prompt"]] + [self.dataset_prompts.draw(p["dataset"]) for p in parts[1:]])
            with BackboneTap(self.network) as tap:
                logits = self.network(torch.cat([images, self.second_view(images)]), torch.cat([prompts, prompts]))
            loss, kept = self.contrast(tap.last.bottleneck, parts)
            # the prompt head's outputs enter with weight 0: every parameter stays in the graph (DDP)
            unused = 0.0 * (logits if torch.is_tensor(logits) else logits[0]).float().mean()
            return {"contrast": loss, "self_paced_kept": torch.tensor(kept), "loss": loss + unused}
        if unlabeled is None:
            return super().train_step(labeled, None)
        u = unlabeled["data"]
        drawn = self.dataset_prompts.draw(unlabeled["dataset"])
        with BackboneTap(self.network) as tap:
            logits = self.network(torch.cat([labeled["data"], u, self.second_view(u)]),
                                  torch.cat([labeled["prompt"], drawn, drawn]))
        own = [level[:n] for level in logits] if isinstance(logits, list) else logits[:n]
        supervised = multiscale(self.loss, own, labeled["target"])
        contrast, kept = self.contrast(tap.last.bottleneck[n:], [unlabeled])
        contrast = self.settings["weight_contrast"] * contrast
        return {"supervised": supervised, "contrast": contrast, "self_paced_kept": torch.tensor(kept),
                "loss": supervised + contrast}
