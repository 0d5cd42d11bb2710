"""TransMedSeg (Wang et al., "TransMedSeg: A Transferable Semantic Framework for Semi-Supervised
Medical Image Segmentation", arXiv 2505.14753, 2025), in 3d and 2d.

What could be read: the abstract. A Transferable Semantic Augmentation (TSA) module augments
teacher features towards student semantics through a lightweight memory module, implicitly: the
augmentation is an expected transferable cross-entropy over the augmented distribution, of which
an upper bound is minimised at negligible cost. The body of the paper could not be read and no
public code was found; the mathematics therefore follows TSA for domain adaptation (Li et al.,
CVPR 2021; public code BIT-DA/TSA, ``Loss.py`` and ``train_TSA.py`` read), which the abstract's
module and bound are named after, carried to a mean teacher (``semantic_augmentation``):

- a mean teacher: the EMA teacher's hard pseudo-labels for every prompt of an unlabeled sample's
  own dataset (voxels below ``confidence_threshold`` left out), and a student that sees a
  perturbed view of the same patch (as ``SelfTrainingTrainer``);
- **features and classifier**: each generated prompt head ends in a linear 8 -> 2 layer; its input,
  the head's last hidden features, are the features TSA augments, and that layer is the
  classifier of the bound (the only linear classifier of a prompted network: ``HeadTap``);
- **memory module**: per prompt and class, running means of the student's and the teacher's
  features and the teacher's covariance, over the pseudo-labelled voxels of each batch
  (momentum ``memory_momentum``). TSA keeps every sample's feature and recomputes the statistics;
  a memory of every voxel is out of reach, so the statistics are running estimates, as ISDA's;
- **the bound**: on unlabeled voxels, the cross-entropy of the student's logits raised by
  ``lambda (w_j - w_y)^T (mu_teacher_y - mu_student_y) + lambda / 2 (w_j - w_y)^T Sigma_teacher_y
  (w_j - w_y)`` against the pseudo-label, ``lambda = lambda0 * t / T`` over the method's epochs
  (TSA's schedule and lambda0 0.25), weighted ``weight_unlabeled`` with a sigmoid ramp-up.

Choices the readable text leaves open, decided here:
- **direction.** The abstract augments *teacher* features towards *student* semantics. A teacher
  gets no gradient, so a bound on teacher features would train only the student's last layer;
  the bound is taken, as TSA takes it, on the trained network's features (the student's),
  shifted towards the other side's statistics (the teacher's, the stable average of the student):
  the student must classify its features as the teacher's class distributions would place them;
- the bound replaces the cross-entropy of the unlabeled term (no Dice on pseudo-labels); the
  labeled batch keeps the shared supervised loss (Dice + CE, deep supervision); labeled voxels
  are not augmented;
- TSA's mutual-information term on target predictions is not in the abstract and is left out;
- the abstract's "cross-domain distribution matching and intra-domain structural preservation"
  are read as the mean shift and the covariance of the bound; nothing else is added;
- the student's perturbation is ``SelfTrainingTrainer``'s (noise, contrast); no CutMix by default
  (``unlabeled_cutmix``), since the abstract names none;
- final weights (no checkpoint selection on test data).
The ``paper`` preset holds these values; none of them could be checked against the paper's.
"""
from __future__ import annotations

import torch

from ...errors import input_error
from ...nets.prompt_head import HEAD_ACTIVATIONS, HEAD_CHANNELS, dynamic_head_hidden, split_head_params
from ..feature_taps import HeadTap
from ..semantic_augmentation import FeatureMemory, augmented_logits, masked_cross_entropy
from .self_training import DEFAULTS as SELF_TRAINING_DEFAULTS
from .self_training import SelfTrainingTrainer

DEFAULTS = {
    **SELF_TRAINING_DEFAULTS,
    "ema_decay": 0.99,        # Mean Teacher's, as measured here; SelfTraining's slower teacher was never tried with it
    "unlabeled_cutmix": False,
    "lambda0": 0.25,          # the augmentation's strength at the end of the method (TSA's default)
    "memory_momentum": 0.1,   # weight of each batch in the running class statistics
}
PRESETS = {"paper": dict(DEFAULTS)}


class TransMedSegTrainer(SelfTrainingTrainer):
    """Mean teacher whose unlabeled term is the transferable semantic augmentation bound on the
    prompt heads' last layer, with a memory of class statistics (module docstring)."""

    method_defaults = DEFAULTS
    method_presets = PRESETS

    def on_train_start(self) -> None:
        super().on_train_start()
        s = self.settings
        if s["lambda0"] < 0:
            raise input_error("--method", f"lambda0 {s['lambda0']} is negative", f"give lambda0 >= 0 (default {DEFAULTS['lambda0']})")
        if s["teacher_mirroring"]:  # the memory takes the teacher's features of one pass, the unflipped patch's
            raise input_error("--method", "teacher_mirroring is not available to TransMedSegTrainer: its memory "
                                          "module reads the teacher's features of the patch as it is, one pass",
                              "leave teacher_mirroring false (the default)")
        if not 0 < s["memory_momentum"] <= 1:
            raise input_error("--method", f"memory_momentum {s['memory_momentum']} is not in (0, 1]",
                              f"give memory_momentum in (0, 1] (default {DEFAULTS['memory_momentum']})")
        real = len(self.real_prompts)
        self.memories = {side: FeatureMemory(real, HEAD_CHANNELS, s["memory_momentum"], device=self.device)
                         for side in ("student", "teacher")}

    def strength(self) -> float:
        """lambda: from 0 to ``lambda0`` over the method's epochs (TSA's linear schedule)."""
        return self.settings["lambda0"] * min(1.0, self.method_epoch / self.method_epochs)

    def train_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        s = self.settings
        if unlabeled is None:
            return super().train_step(labeled, None)
        with HeadTap(self.teacher) as teacher_tap:
            labels, weights = self.pseudo_labels(unlabeled)  # (B_u, real, *S) each
        self.memories["teacher"].update(hidden_features(teacher_tap), labels.flatten(2), weights.flatten(2))
        view, labels, weights = self.student_batch(unlabeled, labels, weights)
        n = labeled["data"].shape[0]
        with HeadTap(self.network) as student_tap:
            supervised, logits = self.joint_pass(labeled, view)  # logits (B_u, real, 2, *S)
        features, prompts = student_tap.last
        params = student_tap.head.head_params(features, prompts)[n:]  # generated heads, with their gradient
        self.memories["student"].update(hidden_features(student_tap, rows=slice(n, None), params=params.detach()),
                                        labels.flatten(2), weights.flatten(2))
        w3 = split_head_params(params)[-1][0]  # (B_u, real, 2, 8)
        student, teacher = self.memories["student"], self.memories["teacher"]
        shift = (teacher.mean - student.mean) * (teacher.seen & student.seen)[..., None]  # 0 until both have seen a class
        augmented = augmented_logits(logits, w3[:, :, 1] - w3[:, :, 0], labels, shift, teacher.covariance,
                                     self.strength())
        bound = masked_cross_entropy(augmented, labels, weights)
        return self._with_total({"supervised": supervised,
                                 "transferable_ce": s["weight_unlabeled"] * self.rampup() * bound})

    def extra_state(self) -> dict:
        return {f"memory_{side}": memory.state_dict() for side, memory in self.memories.items()}

    def load_extra_state(self, state: dict) -> None:
        for side, memory in self.memories.items():
            memory.load_state_dict(state[f"memory_{side}"])


@torch.no_grad()
def hidden_features(tap: HeadTap, rows: slice = slice(None), params: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K, 8, V) the last hidden features of the generated heads of the tapped forward's rows
    (full resolution); ``params``: those rows' generated head parameters, if already computed."""
    features, prompts = tap.last
    params = tap.head.head_params(features, prompts)[rows] if params is None else params
    return dynamic_head_hidden(features.precls[rows], params, HEAD_ACTIVATIONS[tap.head.activation])
