"""Self-training with an EMA teacher's hard pseudo-labels: FixMatch (Sohn et al., NeurIPS 2020) and
Noisy Student (Xie et al., CVPR 2020) carried to segmentation, the baseline people build by hand
around nnU-Net.

Per step, beside the supervised loss on the clean labeled batch (the same as SupervisedTrainer's):
- the EMA teacher labels each unlabeled patch (the loader's augmented view) for every prompt of
  the sample's own dataset: foreground where its probability is above 0.5;
- the student sees a noisier view of the same patch (Gaussian noise of std ``student_noise`` and a
  random contrast and brightness change of up to ``student_contrast``) with a box of another
  unlabeled sample pasted in (``unlabeled_cutmix``; the pseudo-labels are pasted alike). Without
  the paste the student matches its teacher almost at once (pseudo-label loss 0.01) and learns
  little: continuing a converged hippocampus model for 20 minutes, test Dice was 83.13 without
  the paste (2 seeds) and 83.55 with it (3 seeds), SupervisedTrainer 83.11 (benchmarks/RESULTS.md),
  so it is on by default;
- the teacher is a slow EMA of the student (``ema_decay`` 0.999, about the last 1,000 steps): in
  the same hippocampus continuation it reached 83.64 (3 seeds) against 83.55 with 0.99 and 83.56
  with a fixed teacher (1, one seed): a small gain, within two standard deviations of the seeds;
- with ``teacher_mirroring``, the teacher's probabilities are the mean over the patch's mirror
  flips (8 in 3d, 4 in 2d), as prediction with mirroring: a better teacher for 8x its passes. Off
  by default: in the same hippocampus continuation a step cost 1.6x (520 steps instead of about
  850) and Dice was 83.38 against 83.54 for the same two seeds without it; mirroring added only
  0.15 Dice to a converged model's own test predictions;
- masked Dice + CE of the student against the pseudo-labels, over the voxels where the teacher is
  at least ``confidence_threshold`` sure (0: every voxel), weighted ``weight_unlabeled`` with a
  sigmoid ramp-up over ``rampup_fraction`` of the method's epochs.

Labeled images are never mixed or perturbed beyond the loader's augmentation: the copy-paste
methods score labeled voxels only inside pasted images, which cost 2 to 3 Dice points against
SupervisedTrainer on hippocampus MRI (benchmarks/RESULTS.md). Choices the papers leave open for
3D segmentation: the teacher is an EMA of the student (FixMatch uses the student itself, Noisy
Student a fixed earlier model; with ``ema_decay`` 1 the teacher stays the warm-started model); the
loss is the segmentation loss of the labeled term (Dice + CE), not CE alone; the full-resolution
output only (no deep supervision of the unlabeled term).
"""
from __future__ import annotations

import torch

from ...errors import input_error
from ...inference.sliding_window import mirror_axes
from ..losses import foreground_probability, masked_dice_ce
from ..mixing import box_mask, mix
from ..prompts import DatasetPrompts
from ..pseudo_labels import confidence, hard_labels
from .mean_teacher import MeanTeacherTrainer

DEFAULTS = {
    "ema_decay": 0.999,            # a slow teacher (about 1,000 steps): 0.99 gave 0.09 Dice less (module docstring)
    "weight_unlabeled": 1.0,
    "rampup_fraction": 0.25,       # sigmoid ramp-up of weight_unlabeled over this share of the method's epochs
    "confidence_threshold": 0.0,   # pseudo-labelled voxels count where max(p, 1 - p) >= this (0: all)
    "student_noise": 0.1,          # std of the Gaussian noise on the student's view (images are z-scored)
    "student_contrast": 0.1,       # the student's view is scaled by 1 +- this and shifted by +- this
    "unlabeled_cutmix": True,      # paste a box of another unlabeled sample into the student's view
    "cutmix_ratio": 0.5,           # the box's side per axis, as a share of the patch
    "teacher_mirroring": False,    # the teacher's probabilities averaged over the mirror flips of the patch
}


class SelfTrainingTrainer(MeanTeacherTrainer):
    """Supervised loss + masked Dice + CE of a perturbed student view against the EMA teacher's
    hard pseudo-labels on unlabeled patches (one student pass per step, as MeanTeacher)."""

    method_defaults = DEFAULTS

    def on_train_start(self) -> None:
        s = self.settings
        for key in ("ema_decay", "confidence_threshold", "cutmix_ratio"):
            if not 0 <= s[key] <= 1:
                raise input_error("--method", f"{key} {s[key]} is not in [0, 1]",
                                  f"give {key} between 0 and 1 (default {DEFAULTS[key]})")
        for key in ("student_noise", "student_contrast", "weight_unlabeled"):
            if s[key] < 0:
                raise input_error("--method", f"{key} {s[key]} is negative", f"give {key} >= 0 (default {DEFAULTS[key]})")
        self.teacher = self.add_teacher(s["ema_decay"])
        self.dataset_prompts = DatasetPrompts(self.plans, self.device)

    def student_view(self, images: torch.Tensor) -> torch.Tensor:
        """The images with a random contrast and brightness change and Gaussian noise, per sample."""
        s = self.settings
        shape = (images.shape[0],) + (1,) * (images.dim() - 1)
        scale = 1 + s["student_contrast"] * (2 * torch.rand(shape, device=images.device) - 1)
        shift = s["student_contrast"] * (2 * torch.rand(shape, device=images.device) - 1)
        return images * scale + shift + s["student_noise"] * torch.randn_like(images)

    def student_batch(self, unlabeled: dict, labels: torch.Tensor, weights: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(view, labels, weights) the student learns from: its perturbed view of the unlabeled
        patches, with a box of the next sample (cyclically) pasted into each where
        ``unlabeled_cutmix`` is on; images, labels and weights pasted alike."""
        s = self.settings
        view = self.student_view(unlabeled["data"])
        if s["unlabeled_cutmix"] and view.shape[0] > 1:
            inside = box_mask(view.shape[0], view.shape[2:], s["cutmix_ratio"], device=view.device)
            view, labels, weights = (mix(t, t.roll(1, 0), inside) for t in (view, labels, weights))
        return view, labels, weights

    @torch.no_grad()
    def teacher_probability(self, x: torch.Tensor) -> torch.Tensor:
        """(B, real, *S) the teacher's foreground probability of every real prompt, the mean over
        the mirror flips with ``teacher_mirroring``."""
        prompts = self.every_real_prompt(x.shape[0])
        flips = mirror_axes(self.settings["teacher_mirroring"], x.shape[2:])
        return sum(foreground_probability(self.teacher(x.flip(axes), prompts)).flip(axes) for axes in flips) / len(flips)

    @torch.no_grad()
    def pseudo_labels(self, unlabeled: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, weights), each (B_u, real, *S): the teacher's hard labels for every real prompt
        and where they count (a prompt of the sample's own dataset, a confident voxel)."""
        probability = self.teacher_probability(unlabeled["data"])
        own = self.dataset_prompts.own(unlabeled["dataset"])  # (B_u, real)
        weights = own.view(*own.shape, *(1,) * (probability.dim() - 2)).expand_as(probability)
        weights = weights * (confidence(probability) >= self.settings["confidence_threshold"])
        return hard_labels(probability), weights

    def train_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        s = self.settings
        if unlabeled is None:
            return super().train_step(labeled, None)
        labels, weights = self.pseudo_labels(unlabeled)
        view, labels, weights = self.student_batch(unlabeled, labels, weights)
        supervised, logits = self.joint_pass(labeled, view)  # logits (B_u, real, 2, *S)
        rows = logits.shape[0] * logits.shape[1]
        unlabeled_loss = masked_dice_ce(logits.reshape(rows, *logits.shape[2:]), labels.reshape(rows, 1, *labels.shape[2:]),
                                        weights.reshape(rows, 1, *weights.shape[2:]))
        return self._with_total({"supervised": supervised,
                                 "pseudo_label": s["weight_unlabeled"] * self.rampup() * unlabeled_loss})
