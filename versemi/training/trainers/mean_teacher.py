"""Mean Teacher baseline (Tarvainen & Valpola 2017) on the same network and data."""
from __future__ import annotations

import torch

from ..losses import finest, foreground_probability, multiscale
from ..prompts import DatasetPrompts
from ..schedules import sigmoid_rampup
from ..trainer import Trainer

DEFAULTS = {"ema_decay": 0.99, "weight_consistency": 0.1, "rampup_fraction": 0.25, "teacher_noise": 0.1}


class MeanTeacherTrainer(Trainer):
    """Supervised loss + MSE between student and EMA-teacher probabilities on unlabeled patches,
    over every prompt of each unlabeled sample's own dataset (a dataset with two labels has two)."""

    uses_unlabeled = True
    method_defaults = DEFAULTS

    def on_train_start(self) -> None:
        self.teacher = self.add_teacher(self.settings["ema_decay"])  # follows the student after each step
        self.dataset_prompts = DatasetPrompts(self.plans, self.device)

    def train_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        s = self.settings
        if unlabeled is None:
            logits = self.network(labeled["data"], labeled["prompt"])
            return self._with_total({"supervised": multiscale(self.loss, logits, labeled["target"])})
        x = unlabeled["data"]
        supervised, unlabeled_logits = self.joint_pass(labeled, x)
        terms = {"supervised": supervised}
        student = foreground_probability(unlabeled_logits)  # (B_u, real, ...)
        with torch.no_grad():
            noisy = x + torch.clamp(torch.randn_like(x) * s["teacher_noise"], -0.2, 0.2)
            teacher = foreground_probability(self.teacher(noisy, self.every_real_prompt(x.shape[0])))
        # only the prompts of the sample's own dataset: the others' structures are not in its images
        own_prompts = self.dataset_prompts.own(unlabeled["dataset"])  # (B_u, real)
        squared = ((student - teacher) ** 2).flatten(2).mean(2)  # (B_u, real)
        weight = s["weight_consistency"] * self.rampup()
        terms["consistency"] = weight * (squared * own_prompts).sum() / own_prompts.sum()
        return self._with_total(terms)

    def rampup(self) -> float:
        """The unlabeled term's sigmoid ramp-up factor, over ``rampup_fraction`` of the method's epochs."""
        return sigmoid_rampup(self.method_epoch / max(1.0, self.settings["rampup_fraction"] * self.method_epochs))

    def every_real_prompt(self, rows: int) -> torch.Tensor:
        """(rows, real) the real prompt indices, one row per image."""
        return torch.tensor(self.real_prompts, device=self.device).expand(rows, -1)

    def joint_pass(self, labeled: dict, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One student forward over the labeled images and ``images`` (one forward per step also
        suits DDP): a labeled row asks for its own prompt, an image of ``images`` for every real
        prompt. Returns (the supervised loss, the (B_u, real, 2, *S) full-resolution logits of ``images``)."""
        n, real = labeled["data"].shape[0], len(self.real_prompts)
        prompts = torch.cat([labeled["prompt"][:, None].expand(-1, real), self.every_real_prompt(images.shape[0])])
        logits = self.network(torch.cat([labeled["data"], images]), prompts)
        own = [level[:n, 0] for level in logits] if isinstance(logits, list) else logits[:n, 0]
        return multiscale(self.loss, own, labeled["target"]), finest(logits)[n:]

    @staticmethod
    def _with_total(terms: dict) -> dict:
        terms["loss"] = sum(terms.values())
        return terms
