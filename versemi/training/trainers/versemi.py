"""VerSemi (Zeng et al., TMI 2025): task prompts + a synthetic task trained on CutMix images.

Stage 1 (labeled only) and stage 2 (labeled + unlabeled) as in ``shared/design/method.md``.
Every distinct image of a step (plain labeled, CutMix of labeled, labeled pasted into
unlabeled) goes through the backbone once; the logits of all prompts come from that pass.
Choices where the public code is silent or defective:
- a's prompt on a CutMix image is scored only outside the box and b's only inside it (the other
  region's target is unknown for that task); same task -> the full mixed label;
- the stage-2 box supervision uses masks of the image's shape (fixes the public broadcast);
- the ramp-up weight is applied to the consistency term (setting ``rampup``; the public code
  computes it without applying it); ``detach_aggregate`` defaults to False as the public code.
"""
from __future__ import annotations

import math

import torch

from ...errors import input_error
from ..cutmix import box_mask, mix
from ..losses import foreground_probability, soft_dice_loss
from ..trainer import Trainer

DEFAULTS = {
    "stage1_fraction": 0.3,        # share of the epochs spent in stage 1
    "stage1_box_ratio": 2 / 3,
    "stage2_box_ratio": (0.3, 0.6),
    "weight_synthetic": 1.0,
    "weight_task_mix": 1.0,
    "weight_consistency": 1.0,
    "weight_box": 1.0,
    "detach_aggregate": False,
    "rampup": True,
    "rampup_fraction": 0.25,       # of stage 2, sigmoid ramp exp(-5 (1 - t)^2)
}


def sigmoid_rampup(progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - progress) ** 2)


class VerSemiTrainer(Trainer):
    uses_unlabeled = True

    @property
    def settings(self) -> dict:
        return {**DEFAULTS, **self.config.method}

    def on_train_start(self) -> None:
        if self.batch_size < 2:
            raise input_error("--batch-size", f"VerSemiTrainer needs at least 2 labeled samples per process to "
                                              f"CutMix (got {self.batch_size} per process)",
                              "raise the batch size (with several GPUs: at least 2 per GPU)")

    @property
    def stage(self) -> int:
        return 1 if self.epoch < round(self.settings["stage1_fraction"] * self.config.epochs) else 2

    def consistency_weight(self) -> float:
        s = self.settings
        if not s["rampup"]:
            return s["weight_consistency"]
        stage1 = round(s["stage1_fraction"] * self.config.epochs)
        length = max(1.0, s["rampup_fraction"] * (self.config.epochs - stage1))
        return s["weight_consistency"] * sigmoid_rampup((self.epoch - stage1) / length)

    def all_prompt_probabilities(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """One backbone pass over the distinct images; (B, K, Z, Y, X) probabilities and logits each."""
        x = torch.cat(images)
        prompts = torch.arange(self.num_prompts, device=x.device).expand(x.shape[0], -1)
        logits = self.network(x, prompts)  # (N, K, 2, ...)
        return list(torch.split(logits, [i.shape[0] for i in images]))

    def labeled_terms(self, labeled: dict, logits_plain: torch.Tensor, logits_mixed: torch.Tensor,
                      mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Supervised loss, synthetic task on the CutMix of halves a|b, task prompts on it."""
        s = self.settings
        batch = labeled["data"].shape[0]
        own = logits_plain[torch.arange(batch), labeled["prompt"]]
        terms = {"supervised": self.loss(own, labeled["target"])}
        half = batch // 2
        a, b = slice(0, half), slice(half, 2 * half)
        fg, target, prompt = labeled["foreground"], labeled["target"], labeled["prompt"]
        inside = mask[:half]
        synthetic_target = mix(fg[a], fg[b], inside)
        synthetic_prob = foreground_probability(logits_mixed[:, self.synthetic_prompt])[:, None]
        terms["synthetic"] = s["weight_synthetic"] * soft_dice_loss(synthetic_prob, synthetic_target)
        prob_a = foreground_probability(logits_mixed[torch.arange(half), prompt[a]])[:, None]
        prob_b = foreground_probability(logits_mixed[torch.arange(half), prompt[b]])[:, None]
        same = (prompt[a] == prompt[b]).float().view(-1, 1, 1, 1, 1)
        mixed_target = mix(target[a], target[b], inside)
        # same task: the full mixed label; different tasks: a scored outside the box, b inside it
        weight_a = same + (1 - same) * (1 - inside)
        weight_b = same + (1 - same) * inside
        task_a = soft_dice_loss(prob_a, mixed_target, weight_a)
        task_b = soft_dice_loss(prob_b, mixed_target, weight_b)
        terms["task_mix"] = s["weight_task_mix"] * (task_a + task_b) / 2
        return terms

    def train_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        s = self.settings
        x = labeled["data"]
        half = x.shape[0] // 2
        if self.stage == 1:
            ratio = s["stage1_box_ratio"]
        else:
            low, high = s["stage2_box_ratio"]
            ratio = float(torch.empty(1).uniform_(low, high))
        mask = box_mask(half, self.patch_size, ratio, device=x.device)
        mixed = mix(x[:half], x[half:2 * half], mask)
        images = [x, mixed]
        if self.stage == 2 and unlabeled is not None:
            paste = box_mask(min(x.shape[0], unlabeled["data"].shape[0]), self.patch_size, ratio, device=x.device)
            n = paste.shape[0]
            images.append(mix(unlabeled["data"][:n], x[:n], paste))
        logits = self.all_prompt_probabilities(images)
        terms = self.labeled_terms(labeled, logits[0], logits[1], mask)
        if len(logits) == 3:
            probs = foreground_probability(logits[2])  # (n, K, ...)
            synthetic = probs[:, self.synthetic_prompt][:, None]
            aggregate = probs[:, self.real_prompts].amax(1, keepdim=True).clamp(0, 1)
            if s["detach_aggregate"]:
                aggregate = aggregate.detach()
            terms["consistency"] = self.consistency_weight() * soft_dice_loss(synthetic, aggregate)
            # inside the pasted box the labeled sample's foreground is known
            terms["box"] = s["weight_box"] * soft_dice_loss(synthetic, labeled["foreground"][:n], paste)
        terms["loss"] = sum(terms.values())
        return terms
