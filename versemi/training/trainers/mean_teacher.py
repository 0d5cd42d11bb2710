"""Mean Teacher baseline (Tarvainen & Valpola 2017) on the same network and data."""
from __future__ import annotations

import copy

import torch

from ..losses import finest, foreground_probability, multiscale
from ..trainer import Trainer
from .versemi import sigmoid_rampup

DEFAULTS = {"ema_decay": 0.99, "weight_consistency": 0.1, "rampup_fraction": 0.25, "teacher_noise": 0.1}


class MeanTeacherTrainer(Trainer):
    """Supervised loss + MSE between student and EMA-teacher probabilities on unlabeled patches,
    over every prompt of each unlabeled sample's own dataset (a dataset with two labels has two)."""

    uses_unlabeled = True
    method_defaults = DEFAULTS

    def on_train_start(self) -> None:
        self.teacher = copy.deepcopy(self.model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        # (datasets, real prompts) 0/1: which prompts belong to each dataset
        self.dataset_prompt_mask = torch.tensor(
            [[float(p["dataset"] == name) for p in self.plans["prompts"] if p["dataset"] is not None]
             for name in self.plans["dataset_names"]], device=self.device)

    def train_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        s = self.settings
        self._update_teacher()  # the teacher follows the weights of the previous step
        if unlabeled is None:
            logits = self.network(labeled["data"], labeled["prompt"])
            return self._with_total({"supervised": multiscale(self.loss, logits, labeled["target"])})
        x = unlabeled["data"]
        n, real = labeled["data"].shape[0], len(self.real_prompts)
        real_prompts = torch.tensor(self.real_prompts, device=x.device)
        # one student pass over labeled and unlabeled images (one forward per step also suits DDP):
        # a labeled row asks for its own prompt (repeated), an unlabeled row for every real prompt
        prompts = torch.cat([labeled["prompt"][:, None].expand(-1, real), real_prompts.expand(x.shape[0], -1)])
        logits = self.network(torch.cat([labeled["data"], x]), prompts)
        own = [level[:n, 0] for level in logits] if isinstance(logits, list) else logits[:n, 0]
        terms = {"supervised": multiscale(self.loss, own, labeled["target"])}
        student = foreground_probability(finest(logits)[n:])  # (B_u, real, ...)
        with torch.no_grad():
            noisy = x + torch.clamp(torch.randn_like(x) * s["teacher_noise"], -0.2, 0.2)
            teacher = foreground_probability(self.teacher(noisy, real_prompts.expand(x.shape[0], -1)))
        # only the prompts of the sample's own dataset: the others' structures are not in its images
        own_prompts = self.dataset_prompt_mask[unlabeled["dataset"].to(x.device)]  # (B_u, real)
        squared = ((student - teacher) ** 2).flatten(2).mean(2)  # (B_u, real)
        weight = s["weight_consistency"] * sigmoid_rampup(self.epoch / max(1.0, s["rampup_fraction"] * self.config.epochs))
        terms["consistency"] = weight * (squared * own_prompts).sum() / own_prompts.sum()
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
