"""DoDNet-style dynamic prompt head.

A controller maps [pooled bottleneck context, one-hot prompt] to the 162 parameters of a tiny
per-(sample, prompt) head: three 1x1x1 convolutions 8->8, 8->8, 8->2 with an activation between
them (ReLU in DoDNet; leaky ReLU in new plans, see HEAD_ACTIVATIONS). The
decoder features are reduced to 8 channels once ("precls"); the generated head then runs per
prompt. A 1x1x1 convolution is a per-voxel matrix product, so the head is computed with batched
matmuls over (sample, prompt) instead of the public code's grouped convolution; the results
are identical (see tests/test_nets.py).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import BackboneOutput, make_norm

HEAD_CHANNELS = 8
NUM_CLASSES = 2  # background / target
# (out, in) of the three generated 1x1x1 conv layers
HEAD_LAYER_SHAPES = ((HEAD_CHANNELS, HEAD_CHANNELS), (HEAD_CHANNELS, HEAD_CHANNELS), (NUM_CLASSES, HEAD_CHANNELS))
# The public code's layout: all weights (row-major (out, in)), then all biases.
_PARAM_SPLIT = [o * i for o, i in HEAD_LAYER_SHAPES] + [o for o, _ in HEAD_LAYER_SHAPES]
NUM_HEAD_PARAMS = sum(_PARAM_SPLIT)  # 64 + 64 + 16 + 8 + 8 + 2 = 162
# Negative slope of the generated head's hidden activations. With a plain ReLU all 16 hidden
# units of a generated head can go negative for every voxel; no gradient then reaches the
# controller through them, the output is the last bias (background everywhere) and training
# never recovers. Seen on real hippocampus MRI: Dice 0 after 40 minutes, loss flat from epoch 3.
# A small slope keeps a gradient; plans written before carry no key and keep the ReLU.
HEAD_ACTIVATIONS = {"relu": 0.0, "leaky_relu": 0.01}


class PromptFeatures(NamedTuple):
    """The prompt-independent inputs of the head: computed once per image, reused for every prompt."""

    context: torch.Tensor  # (B, C_bottleneck): pooled bottleneck after norm + ReLU
    precls: torch.Tensor  # (B, 8, *S): full-resolution features reduced to the head's width
    deep_precls: tuple[torch.Tensor, ...] = ()  # the same at lower resolutions (deep supervision)


def split_head_params(params: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(..., 162) generated parameters -> per layer (weight (..., out, in), bias (..., out))."""
    if params.shape[-1] != NUM_HEAD_PARAMS:
        raise ValueError(f"expected {NUM_HEAD_PARAMS} head parameters in the last dimension; got {params.shape[-1]}")
    chunks = torch.split(params, _PARAM_SPLIT, dim=-1)
    n_layers = len(HEAD_LAYER_SHAPES)
    lead = params.shape[:-1]
    return [
        (chunks[i].reshape(*lead, *HEAD_LAYER_SHAPES[i]), chunks[n_layers + i])
        for i in range(n_layers)
    ]


def dynamic_head_hidden(precls: torch.Tensor, params: torch.Tensor, negative_slope: float = 0.0) -> torch.Tensor:
    """The generated heads' last hidden features, what their final linear layer classifies:
    (B, 8, *S) and (B, K, 162) -> (B, K, 8, V) with V the flattened voxels.

    ``negative_slope`` is that of the hidden activations (0: ReLU).
    """
    batch, channels, *spatial = precls.shape
    if params.dim() != 3 or params.shape[0] != batch:
        raise ValueError(f"params must be (B={batch}, K, {NUM_HEAD_PARAMS}); got {tuple(params.shape)}")
    prompts = params.shape[1]
    if channels != HEAD_CHANNELS:
        raise ValueError(f"precls must have {HEAD_CHANNELS} channels; got {channels}")
    voxels = precls.reshape(batch, channels, -1)  # (B, 8, V)
    (w1, b1), (w2, b2), _ = split_head_params(params)
    # First layer: stack the K prompts' weights so the shared features are read once: (B, K*8, V).
    h = torch.matmul(w1.reshape(batch, prompts * HEAD_CHANNELS, channels), voxels)
    h = F.leaky_relu(h.view(batch, prompts, HEAD_CHANNELS, -1) + b1[..., None], negative_slope)
    return F.leaky_relu(torch.matmul(w2, h) + b2[..., None], negative_slope)


def apply_dynamic_head(precls: torch.Tensor, params: torch.Tensor, negative_slope: float = 0.0) -> torch.Tensor:
    """Run each (sample, prompt)'s generated head: (B, 8, *S) and (B, K, 162) -> (B, K, 2, *S).

    ``negative_slope`` is that of the hidden activations (0: ReLU).
    """
    h = dynamic_head_hidden(precls, params, negative_slope)
    w3, b3 = split_head_params(params)[-1]
    logits = torch.matmul(w3, h) + b3[..., None]  # (B, K, 2, V)
    return logits.view(*h.shape[:2], NUM_CLASSES, *precls.shape[2:])


CONTEXT_GROUPS = 16  # DoDNet's GroupNorm(16, C) before pooling


CONTEXT_NORMS = ("group", "instance")


def context_norm(norm: str, channels: int, context: str = "group") -> nn.Module:
    """The norm before the controller's pooling: one that keeps per-image channel statistics.

    An (affine) InstanceNorm would give every channel of every image zero mean and unit variance,
    so the pooled context would carry almost nothing of the image. DoDNet uses GroupNorm (each
    channel keeps its level relative to its group); the public VerSemi code BatchNorm (statistics
    over the batch). A plan with batch norm gets BatchNorm, otherwise GroupNorm; ``context=
    "instance"`` rebuilds the affine InstanceNorm of networks planned before (network plans without
    ``context_norm``), so their checkpoints load into the network they were trained as.
    """
    if context not in CONTEXT_NORMS:
        raise ValueError(f"unknown context_norm {context!r}; expected one of {CONTEXT_NORMS}")
    if norm == "batch" or context == "instance":
        return make_norm(norm, channels)
    return nn.GroupNorm(math.gcd(CONTEXT_GROUPS, channels), channels)


class TaskController(nn.Module):
    """Maps [pooled bottleneck context, one-hot prompt] to the 162 parameters of a generated head."""

    def __init__(self, context_channels: int, num_prompts: int, norm: str = "instance", context: str = "group") -> None:
        """A norm + ReLU before pooling, then one linear map (the public code's 1x1x1 conv)."""
        super().__init__()
        self.num_prompts = num_prompts
        self.pre_pool = nn.Sequential(context_norm(norm, context_channels, context), nn.ReLU(inplace=True))
        self.linear = nn.Linear(context_channels + num_prompts, NUM_HEAD_PARAMS)

    def context(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """Global average pool of the normalised bottleneck: (B, C, *s) -> (B, C)."""
        return self.pre_pool(bottleneck).mean(dim=tuple(range(2, bottleneck.dim())))

    def forward(self, context: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """(B, C) context and (B, K) prompt indices -> (B, K, 162) head parameters."""
        onehot = F.one_hot(prompts, self.num_prompts).to(context.dtype)
        per_prompt_context = context[:, None, :].expand(-1, prompts.shape[1], -1)
        return self.linear(torch.cat([per_prompt_context, onehot], dim=-1))


class PreClassifier(nn.Sequential):
    """norm + ReLU + 1x1x1 conv: decoder features -> the generated head's 8 input channels."""

    def __init__(self, in_channels: int, norm: str = "instance") -> None:
        """One per output resolution."""
        super().__init__(make_norm(norm, in_channels), nn.ReLU(inplace=True), nn.Conv3d(in_channels, HEAD_CHANNELS, 1))


class PromptHead(nn.Module):
    """Controller plus one pre-classifier per output resolution (full resolution first)."""

    def __init__(self, bottleneck_channels: int, decoder_channels: Sequence[int], num_prompts: int, norm: str = "instance",
                 context: str = "group", activation: str = "leaky_relu") -> None:
        """decoder_channels[0] is the full-resolution decoder width, the rest deep-supervision levels."""
        super().__init__()
        if activation not in HEAD_ACTIVATIONS:
            raise ValueError(f"unknown head activation {activation!r}; expected one of {sorted(HEAD_ACTIVATIONS)}")
        self.num_prompts = num_prompts
        self.activation = activation
        self.controller = TaskController(bottleneck_channels, num_prompts, norm, context)
        self.preclassifiers = nn.ModuleList(PreClassifier(c, norm) for c in decoder_channels)

    def prepare(self, backbone_output: BackboneOutput) -> PromptFeatures:
        """Everything the head needs that does not depend on the prompt."""
        levels = (backbone_output.decoder, *backbone_output.deep)
        precls = [pre(level) for pre, level in zip(self.preclassifiers, levels)]
        return PromptFeatures(self.controller.context(backbone_output.bottleneck), precls[0], tuple(precls[1:]))

    def head_params(self, features: PromptFeatures, prompts: torch.Tensor) -> torch.Tensor:
        """(B, K) prompt indices -> (B, K, 162) generated parameters."""
        return self.controller(features.context, prompts)

    def forward(self, features: PromptFeatures, prompts: torch.Tensor) -> list[torch.Tensor]:
        """(B, K) prompt indices -> logits (B, K, 2, *S) per prepared resolution, finest first."""
        params = self.head_params(features, prompts)
        slope = HEAD_ACTIVATIONS[self.activation]
        return [apply_dynamic_head(level, params, slope) for level in (features.precls, *features.deep_precls)]
