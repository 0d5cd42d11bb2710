"""An exponential-moving-average teacher (Tarvainen & Valpola 2017), shared by every method that
has one. The loop updates each registered teacher after the optimizer step
(``Trainer.after_optimizer_step``), and checkpoints and resumes it with the student."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMATeacher(nn.Module):
    """A frozen copy of a network whose weights follow ``decay * teacher + (1 - decay) * student``.

    Buffers that are not floating point (e.g. BatchNorm's step counter) are copied. The teacher
    always runs in eval mode and without gradients: its outputs are targets, never trained.
    """

    def __init__(self, student: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1]; got {decay}")
        self.decay = decay
        self.network = copy.deepcopy(student)
        self.network.eval()
        for parameter in self.network.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "EMATeacher":
        return super().train(False)  # a teacher's norms never switch to batch statistics

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        for mine, theirs in zip(self.network.state_dict().values(), student.state_dict().values()):
            if mine.dtype.is_floating_point:
                mine.mul_(self.decay).add_(theirs.detach(), alpha=1 - self.decay)
            else:
                mine.copy_(theirs)

    @torch.no_grad()
    def copy_from(self, student: nn.Module) -> None:
        """Restart from the student's current weights (e.g. when self-training begins)."""
        self.network.load_state_dict(student.state_dict())

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.network(*args, **kwargs)
