"""VerSemi (Zeng et al., TMI 2025): task prompts + a synthetic task trained on CutMix images.

Stage 1 (labeled only) and stage 2 (labeled + unlabeled) as in ``docs/method.md``.
Every distinct image of a step (plain labeled, CutMix of labeled, labeled pasted into
unlabeled) goes through the backbone once; the logits of all prompts come from that pass.
Choices where the public code is silent or defective:
- the labeled batch is shuffled (seeded) before it is split into CutMix halves a|b: the loader
  puts its foreground-centred patches last, which would always paste foreground into background;
- a's prompt on a CutMix image is scored only outside the box and b's only inside it (the other
  region's target is unknown for that task); same task -> the full mixed label. The public
  code's scoring over the whole image (other region = background) is ``task_mix_scoring:
  "whole_image"``;
- stage 2 drops the task-prompt CutMix term, as the paper's stage-2 loss (``stage2_task_mix`` false;
  true keeps it): continuing a converged hippocampus model (10 labeled) it cost 0.35 Dice over three
  seeds (benchmarks/RESULTS.md), and in a 20-minute LA run from scratch 0.8 (one seed).
  ``stage2_labeled_cutmix``
  off drops the labeled CutMix image from stage 2 altogether (with ``weight_box`` above 0 the pastes
  into unlabeled images still supervise the synthetic prompt inside their boxes): one image fewer per step;
- the stage-2 box supervision uses masks of the image's shape (fixes the public broadcast);
- the synthetic prompt's Dice inside the box pasted into an unlabeled image (the paper's box term,
  ``weight_box``) is off by default and on (1) in the ``paper`` preset: continuing a converged
  hippocampus model (10 labeled) it cost 1.0 Dice (82.39 without, 81.37 with it, 3 and 2 seeds);
  continuing one on LA (8 labeled) it changed nothing (benchmarks/RESULTS.md);
- the ramp-up weight is applied to the consistency term (setting ``rampup``; the public code
  computes it without applying it); ``detach_aggregate`` defaults to False as the public code;
- with deep supervision, every term is nnU-Net's weighted sum over the output resolutions;
- where the plan declares structures absent from a dataset's images (``known_absent``), their
  prompts learn the absence (``exclusion_loss``, full resolution) on the plain labeled images
  and on the pasted unlabeled ones, each region by the dataset its voxels came from
  (``weight_known_absent``; the paper has no such term), and they are left out of the max over
  the task prompts that the synthetic prompt's consistency follows there;
- where a joint plan gives a dataset a patch of its own, a step's batches hold one dataset
  (``training.data``), so its CutMix pairs two images of that dataset; with one shared patch
  they may come from two datasets, as in the paper.
"""
from __future__ import annotations

import torch

from ...errors import input_error
from ..mixing import box_mask, mix, shuffled
from ..losses import deep_supervision_weights, exclusion_loss, foreground_probability, resize_to, soft_dice_loss
from ..schedules import sigmoid_rampup
from ..trainer import Trainer

DEFAULTS = {
    "stage1_fraction": 0.3,        # share of the epochs spent in stage 1
    "stage1_box_ratio": 2 / 3,
    "stage2_box_ratio": (0.3, 0.6),
    "weight_synthetic": 1.0,
    "weight_task_mix": 1.0,
    "stage2_task_mix": False,      # the task-prompt CutMix term in stage 2 (the paper has none; module docstring)
    "stage2_labeled_cutmix": True,  # False: stage 2 sends no CutMix of labeled halves (no synthetic / task-mix term)
    "task_mix_scoring": "own_region",  # or "whole_image" (the public code)
    "weight_consistency": 1.0,
    "weight_box": 0.0,             # the paper's box term: 1 in the ``paper`` preset (module docstring)
    "detach_aggregate": False,
    "rampup": True,
    "rampup_fraction": 0.25,       # of stage 2, sigmoid ramp exp(-5 (1 - t)^2)
    "weight_known_absent": 1.0,    # structures the plan declares absent from a dataset (no effect without)
}
# the paper's loss (docs/method.md): stage 2 = supervised + synthetic CutMix + consistency + box, weights 1
PRESETS = {"paper": {"stage2_task_mix": False, "stage2_labeled_cutmix": True, "task_mix_scoring": "own_region",
                     "detach_aggregate": False,
                     "rampup": True, "weight_synthetic": 1.0, "weight_task_mix": 1.0, "weight_consistency": 1.0,
                     "weight_box": 1.0, "stage1_box_ratio": 2 / 3, "stage2_box_ratio": (0.3, 0.6)}}
TASK_MIX_SCORINGS = ("own_region", "whole_image")


class VerSemiTrainer(Trainer):
    uses_unlabeled = True
    method_defaults = DEFAULTS
    method_presets = PRESETS
    learns_known_absent = True
    # a warm start replaces stage 1: stage 2 keeps its labeled terms (supervised, synthetic, task-mix
    # CutMix) by default and ramps the consistency up from 0, so the synthetic prompt, which e.g. a
    # supervised checkpoint never trained, learns before the consistency with it weighs
    warm_up_setting = "stage1_fraction"

    def on_train_start(self) -> None:
        if self.batch_size < 2:
            raise input_error("--batch-size", f"VerSemiTrainer needs at least 2 labeled samples per process to "
                                              f"CutMix (got {self.batch_size} per process)",
                              "raise the batch size (with several GPUs: at least 2 per GPU)")
        if self.settings["task_mix_scoring"] not in TASK_MIX_SCORINGS:
            raise input_error("--method", f"task_mix_scoring {self.settings['task_mix_scoring']!r} is unknown",
                              f"use one of {', '.join(TASK_MIX_SCORINGS)}")
        if not 0 <= self.settings["stage1_fraction"] <= 1:
            raise input_error("--method", f"stage1_fraction {self.settings['stage1_fraction']} is not in [0, 1]",
                              "give the share of the epochs spent in stage 1, e.g. 0.3")

    @property
    def stage1_epochs(self) -> int:
        return round(self.settings["stage1_fraction"] * self.method_epochs)

    def stage_starts(self) -> list[int]:
        return [self.stage1_epochs]

    def unlabeled_from(self) -> int:
        return self.stage1_epochs * self.config.iterations_per_epoch

    def consistency_weight(self) -> float:
        s = self.settings
        if not s["rampup"]:
            return s["weight_consistency"]
        length = max(1.0, s["rampup_fraction"] * (self.method_epochs - self.stage1_epochs))
        return s["weight_consistency"] * sigmoid_rampup((self.method_epoch - self.stage1_epochs) / length)

    def all_prompt_logits(self, images: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """One backbone pass over the distinct images -> per output level (finest first), the
        (B_i, K, 2, *S) logits of every prompt for each image set."""
        x = torch.cat(images)
        prompts = torch.arange(self.num_prompts, device=x.device).expand(x.shape[0], -1)
        out = self.network(x, prompts)
        levels = [out] if torch.is_tensor(out) else list(out)
        sizes = [i.shape[0] for i in images]
        return [list(torch.split(level, sizes)) for level in levels]

    def labeled_terms(self, labeled: dict, logits_plain: torch.Tensor, logits_mixed: torch.Tensor | None,
                      mask: torch.Tensor, task_mix: bool = True) -> dict[str, torch.Tensor]:
        """Supervised loss, synthetic task on the CutMix of halves a|b, task prompts on it
        (no CutMix terms when ``logits_mixed`` is None)."""
        s = self.settings
        batch = labeled["data"].shape[0]
        own = logits_plain[torch.arange(batch), labeled["prompt"]]
        terms = {"supervised": self.loss(own, labeled["target"])}
        if logits_mixed is None:
            return terms
        half = batch // 2
        a, b = slice(0, half), slice(half, 2 * half)
        fg, target, prompt = labeled["foreground"], labeled["target"], labeled["prompt"]
        inside = mask[:half]
        synthetic_target = mix(fg[a], fg[b], inside)
        synthetic_prob = foreground_probability(logits_mixed[:, self.synthetic_prompt])[:, None]
        terms["synthetic"] = s["weight_synthetic"] * soft_dice_loss(synthetic_prob, synthetic_target)
        if not task_mix:
            return terms
        prob_a = foreground_probability(logits_mixed[torch.arange(half), prompt[a]])[:, None]
        prob_b = foreground_probability(logits_mixed[torch.arange(half), prompt[b]])[:, None]
        same = (prompt[a] == prompt[b]).float().view(-1, 1, 1, 1, 1)
        mixed_target = mix(target[a], target[b], inside)
        if s["task_mix_scoring"] == "own_region":
            # same task: the full mixed label; different tasks: a scored outside the box, b inside it
            task_a = soft_dice_loss(prob_a, mixed_target, same + (1 - same) * (1 - inside))
            task_b = soft_dice_loss(prob_b, mixed_target, same + (1 - same) * inside)
        else:  # the public code: the whole image, the other sample's region counted as background
            task_a = soft_dice_loss(prob_a, same * mixed_target + (1 - same) * target[a] * (1 - inside))
            task_b = soft_dice_loss(prob_b, same * mixed_target + (1 - same) * target[b] * inside)
        terms["task_mix"] = s["weight_task_mix"] * (task_a + task_b) / 2
        return terms

    def unlabeled_terms(self, logits_pasted: torch.Tensor, pasted_foreground: torch.Tensor,
                        paste: torch.Tensor, absent: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Consistency of the synthetic prompt with the max over the task prompts on labeled-into-
        unlabeled pastes, and the synthetic prompt supervised inside the pasted box. ``absent``
        (n, K, ...) 0/1: prompts whose structure is declared absent at a voxel, left out of the max."""
        s = self.settings
        probs = foreground_probability(logits_pasted)  # (n, K, ...)
        synthetic = probs[:, self.synthetic_prompt][:, None]
        present = probs if absent is None else probs * (1 - absent)
        aggregate = present[:, self.real_prompts].amax(1, keepdim=True).clamp(0, 1)
        if s["detach_aggregate"]:
            aggregate = aggregate.detach()
        return {"consistency": self.consistency_weight() * soft_dice_loss(synthetic, aggregate),
                # inside the pasted box the labeled sample's foreground is known
                "box": s["weight_box"] * soft_dice_loss(synthetic, pasted_foreground, paste)}

    def train_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        s = self.settings
        labeled = shuffled(labeled)
        x = labeled["data"]
        half = x.shape[0] // 2
        if self.stage == 1:
            ratio = s["stage1_box_ratio"]
        else:
            low, high = s["stage2_box_ratio"]
            ratio = float(torch.empty(1).uniform_(low, high))
        mask = box_mask(half, x.shape[2:], ratio, device=x.device)
        with_cutmix = self.stage == 1 or s["stage2_labeled_cutmix"]
        images = [x, mix(x[:half], x[half:2 * half], mask)] if with_cutmix else [x]
        with_unlabeled = self.stage == 2 and unlabeled is not None
        if with_unlabeled:
            u = unlabeled["data"]
            source = torch.arange(u.shape[0], device=x.device) % x.shape[0]  # labeled sample pasted into each
            paste = box_mask(u.shape[0], x.shape[2:], ratio, device=x.device)
            images.append(mix(u, x[source], paste))
        levels = self.all_prompt_logits(images)
        weights = deep_supervision_weights(len(levels))
        terms: dict[str, torch.Tensor] = {}
        for weight, logits in zip(weights, levels):
            shape = logits[0].shape[-3:]
            scaled = {**labeled, "target": resize_to(labeled["target"], shape),
                      "foreground": resize_to(labeled["foreground"], shape)}
            level_terms = self.labeled_terms(scaled, logits[0], logits[1] if with_cutmix else None,
                                             resize_to(mask, shape), task_mix=self.stage == 1 or s["stage2_task_mix"])
            if with_unlabeled:
                level_paste = resize_to(paste, shape)
                absent = None
                if self.declares_absence:  # per voxel: the dataset of the image it came from
                    absent = (self.absent_prompts(unlabeled["dataset"])[(...,) + (None,) * 3] * (1 - level_paste)
                              + self.absent_prompts(labeled["dataset"][source])[(...,) + (None,) * 3] * level_paste)
                level_terms.update(self.unlabeled_terms(logits[-1], scaled["foreground"][source], level_paste, absent))
            for name, value in level_terms.items():
                terms[name] = terms.get(name, 0.0) + weight * value
        if self.declares_absence and s["weight_known_absent"]:
            finest = levels[0]
            terms["known_absent"] = s["weight_known_absent"] * exclusion_loss(
                finest[0], self.absent_prompts(labeled["dataset"]))
            if with_unlabeled:  # outside the box the unlabeled image's dataset, inside the pasted sample's
                terms["known_absent"] = terms["known_absent"] + s["weight_known_absent"] * (
                    exclusion_loss(finest[-1], self.absent_prompts(unlabeled["dataset"]), 1 - paste)
                    + exclusion_loss(finest[-1], self.absent_prompts(labeled["dataset"][source]), paste))
        terms["loss"] = sum(terms.values())
        return terms
