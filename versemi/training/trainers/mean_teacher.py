"""Mean Teacher baseline (Tarvainen & Valpola 2017) on the same network and data."""
from __future__ import annotations

import copy

import torch

from ..losses import foreground_probability
from ..trainer import Trainer
from .versemi import sigmoid_rampup

DEFAULTS = {"ema_decay": 0.99, "weight_consistency": 0.1, "rampup_fraction": 0.25, "teacher_noise": 0.1}


class MeanTeacherTrainer(Trainer):
    """Supervised loss + MSE between student and EMA-teacher probabilities on unlabeled patches,
    each unlabeled sample through its own dataset's prompts."""

    uses_unlabeled = True

    @property
    def settings(self) -> dict:
        return {**DEFAULTS, **self.config.method}

    def on_train_start(self) -> None:
        self.teacher = copy.deepcopy(self.model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.dataset_prompts = {i: [p["index"] for p in self.plans["prompts"] if p["dataset"] == name]
                                for i, name in enumerate(self.plans["dataset_names"])}

    def train_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        s = self.settings
        self._update_teacher()  # the teacher follows the weights of the previous step
        if unlabeled is None:
            return self._with_total({"supervised": self.loss(self.network(labeled["data"], labeled["prompt"]),
                                                             labeled["target"])})
        x = unlabeled["data"]
        prompts = torch.tensor([self.dataset_prompts[int(d)][0] for d in unlabeled["dataset"]], device=x.device)
        # one student pass over labeled and unlabeled images (one forward per step also suits DDP)
        logits = self.network(torch.cat([labeled["data"], x]), torch.cat([labeled["prompt"], prompts]))
        n = labeled["data"].shape[0]
        terms = {"supervised": self.loss(logits[:n], labeled["target"])}
        student = foreground_probability(logits[n:])
        with torch.no_grad():
            noisy = x + torch.clamp(torch.randn_like(x) * s["teacher_noise"], -0.2, 0.2)
            teacher = foreground_probability(self.teacher(noisy, prompts))
        weight = s["weight_consistency"] * sigmoid_rampup(self.epoch / max(1.0, s["rampup_fraction"] * self.config.epochs))
        terms["consistency"] = weight * torch.mean((student - teacher) ** 2)
        return self._with_total(terms)

    @staticmethod
    def _with_total(terms: dict) -> dict:
        terms["loss"] = sum(terms.values())
        return terms

    @torch.no_grad()
    def _update_teacher(self) -> None:
        decay = self.settings["ema_decay"]
        for t, p in zip(self.teacher.state_dict().values(), self.model.state_dict().values()):
            if t.dtype.is_floating_point:
                t.mul_(decay).add_(p.detach(), alpha=1 - decay)
            else:
                t.copy_(p)

    def extra_state(self) -> dict:
        return {"teacher": self.teacher.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
