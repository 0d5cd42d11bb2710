"""Taps on a network's backbone features, for methods with feature-level losses (M3HL).

The prompt-conditioned network's ``forward`` returns logits only; a tap records what its backbone
handed to the prompt head on every forward while the tap is open: the full-resolution decoder
features (low level) and the bottleneck (high level). A forward hook keeps the network's forward
untouched, so DDP and the other methods pay nothing.
"""
from __future__ import annotations

from torch import nn

from ..nets.backbones import BackboneOutput


class BackboneTap:
    """``with BackboneTap(model) as tap: model(x, p)``; then ``tap.outputs`` holds one
    ``BackboneOutput`` (decoder, bottleneck, deep) per forward, in order."""

    def __init__(self, model: nn.Module) -> None:
        model = getattr(model, "module", model)  # through DDP
        model = getattr(model, "network", model)  # through an EMA teacher
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
