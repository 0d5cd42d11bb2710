"""M3HL: mutual mask mix with high/low-level feature consistency (Liu et al., MICCAI 2025,
arXiv 2508.03752; public code PHPJava666/M3HL).

BCP's self-training with two changes: the pasted region is a random half of the patch's blocks
(4 x 4 x 4 blocks here, masked-image-modelling style) instead of one box, used both ways (the
unlabeled sample where the mask is 1 in the first image, the labeled one there in the second);
and feature consistency between the student on each mixed image and the EMA teacher on the
unlabeled image inside it: L1 on the low-level features (the full-resolution decoder output) and
1 - cosine similarity on the high-level ones (the bottleneck). Total: mixed loss +
``weight_features`` x (low + high) / 2, the public weighting when ``weight_features`` is 1.

Deliberate differences from the public (2D ACDC) code:
- a labeled pre-training stage before self-training (``pretrain_fraction``, BCP's); the public
  code has none and starts its teacher from other random weights. ``--method paper`` sets
  ``pretrain_fraction`` 0 (the teacher then starts as a copy of the initial student);
- each mixed image is compared only with the teacher's features of the unlabeled image it
  contains; the public code also averages in the two pairs that share no content;
- the teacher runs in eval mode (the public teacher uses batch statistics and dropout);
- 3D blocks sized from the actual patch; the public mask asserts a 256 x 256 slice;
- as BCPTrainer: the trainer's optimizer and poly decay for every stage, final weights,
  foreground Dice, per-dataset prompts for every piece, deep supervision per level.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import input_error
from ..feature_taps import BackboneTap
from ..mixing import Regions, block_mask
from .bcp import DEFAULTS as BCP_DEFAULTS
from .bcp import BCPTrainer

DEFAULTS = {**BCP_DEFAULTS, "blocks_per_axis": 4, "mask_ratio": 0.5, "weight_features": 1.0}
PRESETS = {"paper": {**DEFAULTS, "pretrain_fraction": 0.0}}


class M3HLTrainer(BCPTrainer):
    method_defaults = DEFAULTS
    method_presets = PRESETS

    def on_train_start(self) -> None:
        super().on_train_start()
        s = self.settings
        if not 0 < s["mask_ratio"] < 1:
            raise input_error("--method", f"mask_ratio {s['mask_ratio']} is not in (0, 1)",
                              "give the share of blocks taken from the other image, e.g. 0.5")
        for patch in self.effective.all_patch_sizes:
            sides = [side for side in patch if side > 1]  # a 2d patch's slice axis is one block
            if not isinstance(s["blocks_per_axis"], int) or not 1 <= s["blocks_per_axis"] <= min(sides):
                raise input_error("--method", f"blocks_per_axis {s['blocks_per_axis']} does not fit the patch "
                                              f"{patch}", "give an integer from 1 to the smallest patch side")

    def mixing_mask(self, count: int, images: torch.Tensor) -> torch.Tensor:
        s = self.settings
        return block_mask(count, images.shape[2:], s["blocks_per_axis"], s["mask_ratio"], device=images.device)

    def pseudo_labeled(self, unlabeled: dict) -> Regions:
        with BackboneTap(self.teacher) as tap:
            regions = super().pseudo_labeled(unlabeled)
        self.teacher_features = tap.last
        return regions

    def student_loss(self, groups: list[Regions]):
        with BackboneTap(self.network) as tap:
            result = super().student_loss(groups)
        self.student_features = tap.last
        return result

    def extra_terms(self, groups: list[Regions], unlabeled: torch.Tensor) -> dict[str, torch.Tensor]:
        # row r of the mixed images contains unlabeled sample r (the a pairs, then the b pairs)
        rows = unlabeled.shape[0]
        student, teacher = self.student_features, self.teacher_features
        low = F.l1_loss(student.decoder[:rows].float(), teacher.decoder[:rows].float())
        high = 1 - F.cosine_similarity(student.bottleneck[:rows].float().flatten(1),
                                       teacher.bottleneck[:rows].float().flatten(1)).mean()
        weight = self.settings["weight_features"] / 2
        return {"low_level": weight * low, "high_level": weight * high}
