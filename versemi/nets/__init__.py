"""The VerSemi network: a 3D backbone run once per image plus a DoDNet-style prompt head per prompt.

    model = build_network(network_plan, in_channels=1, num_prompts=K)
    model(x, one_prompt_each)             # LongTensor (B,)    -> logits (B, 2, Z, Y, X)
    model(x, several_prompts_each)        # LongTensor (B, K') -> logits (B, K', 2, Z, Y, X)
    feats = model.features(x)             # one backbone pass ...
    a, b = model.head(feats, p1), model.head(feats, p2)   # ... then several prompt sets
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .bf16_guard import guard_bf16_convolutions
from .backbones import NORM_NAMES, Backbone, BackboneOutput, UNetBackbone, VNetBackbone, make_norm
from .prompt_head import (
    HEAD_CHANNELS,
    NUM_CLASSES,
    NUM_HEAD_PARAMS,
    PromptFeatures,
    PromptHead,
    TaskController,
    apply_dynamic_head,
    split_head_params,
)

__all__ = [
    "ARCHITECTURES",
    "HEAD_CHANNELS",
    "NORM_NAMES",
    "NUM_CLASSES",
    "NUM_HEAD_PARAMS",
    "Backbone",
    "BackboneOutput",
    "PromptFeatures",
    "PromptHead",
    "PromptedSegmenter",
    "TaskController",
    "UNetBackbone",
    "VNetBackbone",
    "apply_dynamic_head",
    "build_network",
    "make_norm",
    "split_head_params",
]

ARCHITECTURES = ("unet", "vnet")
Logits = torch.Tensor | list[torch.Tensor]


class PromptedSegmenter(nn.Module):
    """Backbone + prompt head. The backbone never sees the prompt, so it runs once per forward.

    With deep supervision (a backbone built with deep_levels > 0) and in training mode, outputs
    are lists of logits, full resolution first, then the coarser levels at their own resolution
    (nnU-Net convention: downsample the targets). Otherwise outputs are single tensors.
    """

    def __init__(self, backbone: Backbone, num_prompts: int, norm: str = "instance", context_norm: str = "group",
                 head_activation: str = "leaky_relu") -> None:
        """num_prompts = number of real tasks + 1 synthetic (the synthetic prompt is the last index)."""
        super().__init__()
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be at least 1; got {num_prompts}")
        self.num_prompts = num_prompts
        self.backbone = backbone
        self.prompt_head = PromptHead(backbone.bottleneck_channels, backbone.decoder_channels, num_prompts, norm,
                                      context_norm, head_activation)

    @property
    def divisor(self) -> tuple[int, int, int]:
        """Every spatial side of the input must be a multiple of this."""
        return self.backbone.divisor

    @property
    def deep_supervision(self) -> bool:
        """Whether training-mode outputs include the lower-resolution logits."""
        return self.backbone.deep_levels > 0

    def features(self, x: torch.Tensor) -> PromptFeatures:
        """The prompt-independent part of the forward pass: (B, C, Z, Y, X) -> PromptFeatures."""
        if x.dim() != 5:
            raise ValueError(f"expected input of shape (B, C, Z, Y, X); got {tuple(x.shape)}")
        self.backbone.check_input_size(x.shape[2:])
        out = self.backbone(x)
        if not self.training:
            out = out._replace(deep=())  # deep supervision is a training-time signal only
        return self.prompt_head.prepare(out)

    def head(self, features: PromptFeatures, prompts: torch.Tensor) -> Logits:
        """Logits for prompts (B,) -> (B, 2, *S) or (B, K') -> (B, K', 2, *S) from prepared features."""
        prompt_matrix = self._prompt_matrix(prompts, features.context.shape[0], features.context.device)
        levels = self.prompt_head(features, prompt_matrix)
        if prompts.dim() == 1:
            levels = [level[:, 0] for level in levels]
        return levels if features.deep_precls else levels[0]

    def head_params(self, features: PromptFeatures, prompts: torch.Tensor) -> torch.Tensor:
        """The generated head parameters, (B, K', 162) (or (B, 162) for prompts of shape (B,))."""
        prompt_matrix = self._prompt_matrix(prompts, features.context.shape[0], features.context.device)
        params = self.prompt_head.head_params(features, prompt_matrix)
        return params[:, 0] if prompts.dim() == 1 else params

    def forward(self, x: torch.Tensor, prompts: torch.Tensor) -> Logits:
        """One backbone pass, then the cheap generated head once per prompt."""
        return self.head(self.features(x), prompts)

    def _prompt_matrix(self, prompts: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        """Validate prompt indices and return them as a (B, K') long tensor."""
        if not isinstance(prompts, torch.Tensor) or prompts.dtype.is_floating_point or prompts.dtype == torch.bool:
            raise ValueError("prompts must be an integer tensor of prompt indices, shape (B,) or (B, K')")
        if prompts.dim() not in (1, 2) or prompts.shape[0] != batch or prompts.numel() == 0:
            raise ValueError(f"prompts must have shape ({batch},) or ({batch}, K') with K' >= 1; got {tuple(prompts.shape)}")
        low, high = int(prompts.min()), int(prompts.max())
        if low < 0 or high >= self.num_prompts:
            raise ValueError(f"prompt indices must lie in [0, {self.num_prompts - 1}]; got values in [{low}, {high}]")
        prompts = prompts.to(device=device, dtype=torch.long)
        return prompts[:, None] if prompts.dim() == 1 else prompts


def _require(plan: Mapping[str, Any], key: str) -> Any:
    """A key of the network plan, or a ValueError naming it."""
    if key not in plan:
        raise ValueError(f"network plan lacks {key!r} (has: {sorted(plan)})")
    return plan[key]


def build_network(network_plan: Mapping[str, Any], in_channels: int, num_prompts: int) -> PromptedSegmenter:
    """The segmenter described by a planner's network plan (architecture 'unet' or 'vnet')."""
    architecture = network_plan.get("architecture", "unet")
    norm = network_plan.get("norm", "instance")
    spatial_dims = int(network_plan.get("spatial_dims", 3))
    deep_supervision = bool(network_plan.get("deep_supervision", False))
    if norm not in NORM_NAMES:
        raise ValueError(f"network plan: unknown norm {norm!r}; expected one of {NORM_NAMES}")
    if architecture == "unet":
        features = _require(network_plan, "features")
        max_levels = len(features) - 2  # every decoder output but the full-resolution one
        levels = int(network_plan.get("deep_supervision_levels", max_levels)) if deep_supervision else 0
        backbone: Backbone = UNetBackbone(
            in_channels,
            features,
            _require(network_plan, "kernel_sizes"),
            _require(network_plan, "strides"),
            norm=norm,
            deep_levels=levels,
            spatial_dims=spatial_dims,
        )
    elif architecture == "vnet":
        if spatial_dims != 3:
            raise ValueError("network plan: the V-Net is 3d only; a 2d configuration trains the U-Net")
        base_filters = int(network_plan.get("features", [16])[0])  # the V-Net's widths are fixed multiples
        levels = int(network_plan.get("deep_supervision_levels", 3)) if deep_supervision else 0
        backbone = VNetBackbone(
            in_channels, base_filters, norm=norm, residual=bool(network_plan.get("residual", False)), deep_levels=levels
        )
    else:
        raise ValueError(f"network plan: unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")
    # plans made before the controller context kept image statistics, or before the leaky head,
    # have no key: rebuild them as trained
    model = PromptedSegmenter(backbone, num_prompts, norm=norm, context_norm=network_plan.get("context_norm", "instance"),
                              head_activation=network_plan.get("head_activation", "relu"))
    return guard_bf16_convolutions(model)
