"""Taps on a network's features, for methods with feature-level losses (M3HL, TransMedSeg).

The prompt-conditioned network's ``forward`` returns logits only; a tap records, on every forward
while it is open, what the backbone handed to the prompt head (the full-resolution decoder
features and the bottleneck: ``BackboneTap``), or what the prompt head was given (its prepared
features and the prompts: ``HeadTap``). A forward hook keeps the network's forward untouched, so
DDP and the other methods pay nothing.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nets.backbones import BackboneOutput
from ..nets.prompt_head import PromptFeatures


def segmenter(model: nn.Module) -> nn.Module:
    """The prompted segmenter inside a DDP wrapper or an EMA teacher (or ``model`` itself)."""
    model = getattr(model, "module", model)  # through DDP
    return getattr(model, "network", model)  # through an EMA teacher


class BackboneTap:
    """``with BackboneTap(model) as tap: model(x, p)``; then ``tap.outputs`` holds one
    ``BackboneOutput`` (decoder, bottleneck, deep) per forward, in order."""

    def __init__(self, model: nn.Module) -> None:
        model = segmenter(model)
        if not hasattr(model, "backbone"):
            raise TypeError(f"{type(model).__name__} has no backbone to tap")
        self.backbone = model.backbone
        self.outputs: list[BackboneOutput] = []

    def __enter__(self) -> "BackboneTap":
        self.handle = self.backbone.register_forward_hook(lambda module, inputs, output: self.outputs.append(output))
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    @property
    def last(self) -> BackboneOutput:
        return self.outputs[-1]


class HeadTap:
    """``with HeadTap(model) as tap: model(x, p)``; then ``tap.inputs`` holds, per forward, the
    prompt head's ``PromptFeatures`` and its (B, K) prompt matrix; ``tap.head`` is the prompt head
    (to regenerate a head's parameters from them)."""

    def __init__(self, model: nn.Module) -> None:
        model = segmenter(model)
        if not hasattr(model, "prompt_head"):
            raise TypeError(f"{type(model).__name__} has no prompt head to tap")
        self.head = model.prompt_head
        self.inputs: list[tuple[PromptFeatures, torch.Tensor]] = []

    def __enter__(self) -> "HeadTap":
        self.handle = self.head.register_forward_hook(lambda module, inputs, output: self.inputs.append(inputs))
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    @property
    def last(self) -> tuple[PromptFeatures, torch.Tensor]:
        return self.inputs[-1]
