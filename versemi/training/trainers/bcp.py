"""BCP: bidirectional copy-paste (Bai et al., "Bidirectional Copy-Paste for Semi-Supervised Medical
Image Segmentation", CVPR 2023; public code DeepMed-Lab-ECNU/BCP).

Stage 1 (pre-training, labeled only): a box of labeled image b pasted into labeled image a and
a's box into b, the labels mixed alike. Stage 2 (self-training): an EMA teacher, started from the pre-trained weights,
pseudo-labels the unlabeled images (foreground where p >= 0.5, the largest connected component
kept). Per pair of labeled (l) and unlabeled (u) samples, two images: u's box pasted into l, and
l's box pasted into u. Each is scored with masked Dice + CE, labeled voxels with weight 1 and
pseudo-labeled ones with ``u_weight`` (0.5). The teacher follows the student after every step.

Deliberate differences from the public code:
- one loop and optimizer for both stages (the trainer's Adam/SGD with poly decay, the same for
  every method compared), instead of SGD without decay, then x0.1 every 2500 iterations; the
  stage-1 share of the iterations is ``pretrain_fraction`` (the public 2000 of 17000 = 0.12);
- the final weights are used (no selection of the best checkpoint on test cases);
- pre-training pastes both ways (b into a and a into b), so every labeled sample of the batch
  is used (the public code makes one image per pair). On a CPU this also keeps the batch above
  one image: PyTorch runs a one-image 3D convolution with few channels on its slow im2col path
  (4.2 s against 1.7 s per step here);
- Dice over the foreground only (the public Dice also averages the background class), and Dice +
  CE is not halved (a constant factor);
- one box per sample, not one for the whole batch; boxes sized from the actual patch;
- several datasets: each piece of a pasted image is scored with the prompt of the dataset it came
  from (the unlabeled sample's prompt drawn among its dataset's, the teacher asked for the same);
- with deep supervision, every term is nnU-Net's weighted sum over the output resolutions;
- ``labeled_weight`` (0 by default, the paper's loss) adds the shared supervised loss of the
  labeled images as they are, unpasted, to self-training: the paper's stage 2 sees labeled voxels
  only inside mixed images. Continuing a converged hippocampus model, weight 1 gave +0.83 Dice and
  still lost 2.48 to SupervisedTrainer: what costs there is the mixed image itself, which the
  converged model segments 3.3-3.6x worse than the same voxels unmixed (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import torch

from ...errors import input_error
from ..losses import foreground_probability
from ..mixing import Regions, box_mask, shuffled
from ..prompts import DatasetPrompts
from ..pseudo_labels import confidence, hard_labels, largest_component
from ..trainer import Trainer

DEFAULTS = {
    "pretrain_fraction": 0.12,   # share of the epochs pre-trained on labeled copy-paste
    "box_ratio": 2 / 3,          # the box's side per axis, as a share of the patch
    "u_weight": 0.5,             # loss weight of pseudo-labeled voxels
    "ema_decay": 0.99,
    "largest_component": True,   # keep only the pseudo-label's largest connected component
    "labeled_weight": 0.0,       # weight of the plain labeled images' supervised loss in self-training
}
PRESETS = {"paper": dict(DEFAULTS)}


class BCPTrainer(Trainer):
    """The copy-paste family's loop: stage 1 labeled pastes, stage 2 bidirectional pastes between
    labeled and unlabeled samples with teacher pseudo-labels. Subclasses change the mask
    (``mixing_mask``), add terms (``extra_terms``) or reshape the pasted images (``rearrange``)."""

    uses_unlabeled = True
    method_defaults = DEFAULTS
    method_presets = PRESETS
    warm_up_setting = "pretrain_fraction"  # a warm start replaces the pre-training (the teacher starts from it)

    def on_train_start(self) -> None:
        s = self.settings
        if self.batch_size < 2:
            raise input_error("--batch-size", f"{type(self).__name__} pastes between pairs of labeled samples and "
                                              f"needs at least 2 per process (got {self.batch_size})",
                              "raise the batch size (with several GPUs: at least 2 per GPU)")
        if self.unlabeled_source is not None and self.unlabeled_batch_size < 2:
            raise input_error("--unlabeled-batch-size", f"{type(self).__name__} pastes in both directions and needs "
                                                        f"at least 2 unlabeled samples per process "
                                                        f"(got {self.unlabeled_batch_size})", "use 2 or more")
        if s["labeled_weight"] < 0:
            raise input_error("--method", f"labeled_weight {s['labeled_weight']} is negative",
                              "give 0 (mixed images only, the paper's loss) or a positive weight, e.g. 1")
        for key in ("pretrain_fraction", "u_weight", "ema_decay"):
            if not 0 <= s[key] <= 1:
                raise input_error("--method", f"{key} {s[key]} is not in [0, 1]",
                                  f"give {key} between 0 and 1 (default {self.method_defaults[key]})")
        self.dataset_prompts = DatasetPrompts(self.plans, self.device)
        self.teacher = self.add_teacher(s["ema_decay"])

    # ----- stages -----
    @property
    def pretrain_epochs(self) -> int:
        return round(self.settings["pretrain_fraction"] * self.method_epochs)

    def stage_starts(self) -> list[int]:
        return [self.pretrain_epochs]

    def unlabeled_from(self) -> int:
        return self.pretrain_epochs * self.config.iterations_per_epoch

    def self_training_progress(self) -> float:
        """0 at the start of self-training, 1 at the end of the schedule."""
        return (self.method_epoch - self.pretrain_epochs) / max(1, self.method_epochs - self.pretrain_epochs)

    def on_stage_start(self, stage: int) -> None:
        self.teacher.copy_from(self.model)  # self-training starts from the pre-trained weights

    def after_optimizer_step(self, iteration: int) -> None:
        if self.stage == 2:  # the teacher is only read in self-training
            super().after_optimizer_step(iteration)

    # ----- hooks of the family -----
    def mixing_mask(self, count: int, images: torch.Tensor) -> torch.Tensor:
        """(count, 1, *patch) 0/1 on the device and patch of ``images``: where the pasted image shows
        the other sample."""
        return box_mask(count, images.shape[2:], self.settings["box_ratio"], device=images.device)

    def rearrange(self, groups: list[Regions]) -> list[Regions]:
        """The pasted images of a self-training step, before they are scored (unchanged here)."""
        return groups

    def extra_terms(self, groups: list[Regions], unlabeled: torch.Tensor) -> dict[str, torch.Tensor]:
        """Further loss terms, after the student's forward (features may be tapped)."""
        return {}

    # ----- the step -----
    @torch.no_grad()
    def pseudo_labeled(self, unlabeled: dict) -> Regions:
        """The unlabeled images with the teacher's labels for one prompt of their own dataset."""
        x = unlabeled["data"]
        prompts = self.dataset_prompts.draw(unlabeled["dataset"])
        probability = foreground_probability(self.teacher(x, prompts))[:, None]
        labels = hard_labels(probability)
        if self.settings["largest_component"]:
            labels = largest_component(labels)
        return Regions.whole(x, prompts, labels, self.settings["u_weight"], confidence(probability))

    def student_loss(self, groups: list[Regions]) -> tuple[torch.Tensor, list]:
        """One student forward over every group's images; (sum of the groups' losses, logits)."""
        logits = self.network(torch.cat([g.images for g in groups]), torch.cat([g.prompts for g in groups]))
        sizes = [g.images.shape[0] for g in groups]
        levels = [logits] if torch.is_tensor(logits) else logits
        per_group = list(zip(*[torch.split(level, sizes) for level in levels]))
        loss = sum(g.loss(parts[0] if torch.is_tensor(logits) else list(parts)) for g, parts in zip(groups, per_group))
        return loss, logits

    def train_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        labeled = shuffled(labeled)
        known = Regions.whole(labeled["data"], labeled["prompt"], labeled["target"])
        if self.stage == 1 or unlabeled is None:
            half = labeled["data"].shape[0] // 2
            a, b = known.rows(slice(0, half)), known.rows(slice(half, 2 * half))
            inside = self.mixing_mask(half, a.images)
            loss, _ = self.student_loss([a.paste(b, inside), b.paste(a, inside)])  # both ways: every sample used
            return {"pretrain_mix": loss, "loss": loss}
        guessed = self.pseudo_labeled(unlabeled)
        pairs = min(known.images.shape[0], guessed.images.shape[0]) // 2
        a, b = slice(0, pairs), slice(pairs, 2 * pairs)
        inside = self.mixing_mask(pairs, known.images)
        # the same mask both ways: u's piece into l (a pairs), l's piece into u (b pairs)
        groups = self.rearrange([known.rows(a).paste(guessed.rows(a), inside),
                                 guessed.rows(b).paste(known.rows(b), inside)])
        loss, _ = self.student_loss(groups)
        terms = {"copy_paste": loss, **self.extra_terms(groups, guessed.images[:2 * pairs])}
        if self.settings["labeled_weight"] > 0:
            # the shared supervised step on the labeled images as they are, beside their pastes
            terms.update({name: self.settings["labeled_weight"] * term
                          for name, term in self.supervised_terms(self.network, labeled).items()})
        terms["loss"] = sum(terms.values())
        return terms
