"""3D encoder-decoder backbones for the prompted segmenter (the U-Net also in 2d).

Each backbone returns its full-resolution decoder features, the bottleneck feature map (the
prompt controller pools it) and, when deep supervision is asked for, the lower-resolution
decoder outputs. None of them sees the task prompt: that is what lets one backbone pass serve
every prompt.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from monai.networks.nets import DynUNet
from torch import nn

NORM_NAMES = ("instance", "batch")
VNET_CONVS_PER_STAGE = (1, 2, 3, 3, 3)  # as in the public V-Net (UA-MT / VerSemi)


def make_norm(name: str, channels: int) -> nn.Module:
    """A 3D normalisation layer from its plan name ('instance' or 'batch'), with affine parameters."""
    if name == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if name == "batch":
        return nn.BatchNorm3d(channels)
    raise ValueError(f"unknown norm {name!r}; expected one of {NORM_NAMES}")


def _dynunet_norm(name: str) -> tuple | str:
    """MONAI's spelling of the same normalisation for DynUNet."""
    if name == "instance":
        return ("INSTANCE", {"affine": True})
    if name == "batch":
        return "BATCH"
    raise ValueError(f"unknown norm {name!r}; expected one of {NORM_NAMES}")


class BackboneOutput(NamedTuple):
    """What a backbone hands to the prompt head."""

    decoder: torch.Tensor  # (B, decoder_channels[0], *input spatial size)
    bottleneck: torch.Tensor  # (B, bottleneck_channels, *input size / divisor)
    deep: tuple[torch.Tensor, ...] = ()  # lower-resolution decoder outputs, finest first


class Backbone(nn.Module):
    """Common interface: channel counts, the input-size divisor and the input-size check."""

    # decoder_channels[0] belongs to the full-resolution output, [1:] to the deep levels returned.
    decoder_channels: tuple[int, ...]
    bottleneck_channels: int
    divisor: tuple[int, int, int]
    deep_levels: int

    def check_input_size(self, spatial_shape: Sequence[int]) -> None:
        """Raise ValueError unless every spatial side is a multiple of the network's total stride."""
        spatial_shape = tuple(int(s) for s in spatial_shape)
        if len(spatial_shape) != 3:
            raise ValueError(f"expected a 3D input (B, C, Z, Y, X); got spatial shape {spatial_shape}")
        if any(s % d for s, d in zip(spatial_shape, self.divisor)):
            raise ValueError(
                f"input spatial size {spatial_shape} is not divisible by {self.divisor}, the product "
                f"of the network's strides per axis; pad or crop the patch to a multiple of {self.divisor}"
            )


def _as_triple(value: Sequence[int] | int, what: str, stage: int) -> tuple[int, int, int]:
    """One kernel or stride entry of the plan as three positive ints."""
    triple = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(triple) != 3 or not all(isinstance(v, int) and v > 0 for v in triple):
        raise ValueError(f"network plan: {what}[{stage}] = {value!r} must be three positive integers")
    return triple  # type: ignore[return-value]


class UNetBackbone(Backbone):
    """nnU-Net-style 3D U-Net: MONAI DynUNet's blocks, run by a forward that exposes the features.

    DynUNet's own forward only returns logits; its recursive `skip_layers` hides the bottleneck.
    So the DynUNet is built (for its blocks, checks and weight init) and only its
    input/down/bottleneck/up blocks are kept; its output and supervision heads are dropped.

    ``spatial_dims=2`` builds a 2d U-Net (true 2d convolutions) for inputs of one slice, (B, C, 1,
    Y, X): the plan still gives kernels and strides in (z, y, x), with 1 along z. Inputs and
    outputs keep the slice axis, so everything around the network stays the same in 2d and 3d.
    """

    def __init__(
        self,
        in_channels: int,
        features: Sequence[int],
        kernel_sizes: Sequence[Sequence[int] | int],
        strides: Sequence[Sequence[int] | int],
        norm: str = "instance",
        deep_levels: int = 0,
        spatial_dims: int = 3,
    ) -> None:
        """Stage i has features[i] channels, kernel_sizes[i] and strides[i] (strides[0] must be 1)."""
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"network plan: spatial_dims must be 2 or 3; got {spatial_dims!r}")
        n_stages = len(features)
        if not (len(kernel_sizes) == len(strides) == n_stages):
            raise ValueError(
                f"network plan: features, kernel_sizes and strides need one entry per stage; got "
                f"{n_stages}, {len(kernel_sizes)} and {len(strides)}"
            )
        if n_stages < 3:
            raise ValueError(f"network plan: a U-Net needs at least 3 stages; got {n_stages}")
        kernels = [_as_triple(k, "kernel_sizes", i) for i, k in enumerate(kernel_sizes)]
        stride_triples = [_as_triple(s, "strides", i) for i, s in enumerate(strides)]
        if stride_triples[0] != (1, 1, 1):
            raise ValueError(f"network plan: strides[0] must be [1, 1, 1] (full-resolution stage); got {strides[0]}")
        if not 0 <= deep_levels <= n_stages - 2:
            raise ValueError(f"deep_levels must be in [0, {n_stages - 2}] for {n_stages} stages; got {deep_levels}")
        if spatial_dims == 2 and any(k[0] != 1 or st[0] != 1 for k, st in zip(kernels, stride_triples)):
            raise ValueError("network plan: a 2d U-Net needs kernel and stride 1 along z at every stage; got "
                             f"kernel_sizes {[list(k) for k in kernels]}, strides {[list(st) for st in stride_triples]}")
        # DynUNet's own layout: the in-plane entries in 2d
        dyn_kernels = kernels if spatial_dims == 3 else [k[1:] for k in kernels]
        dyn_strides = stride_triples if spatial_dims == 3 else [st[1:] for st in stride_triples]

        dynunet = DynUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=1,  # its output block is discarded below
            kernel_size=dyn_kernels,
            strides=dyn_strides,
            upsample_kernel_size=dyn_strides[1:],
            filters=list(features),
            norm_name=_dynunet_norm(norm),
        )
        self.input_block = dynunet.input_block
        self.downsamples = dynunet.downsamples
        self.bottleneck = dynunet.bottleneck
        self.upsamples = dynunet.upsamples  # coarsest first

        self.decoder_channels = tuple(int(f) for f in features[: deep_levels + 1])
        self.bottleneck_channels = int(features[-1])
        self.divisor = tuple(math.prod(axis) for axis in zip(*stride_triples))  # type: ignore[assignment]
        self.deep_levels = deep_levels
        self.spatial_dims = spatial_dims

    def check_input_size(self, spatial_shape: Sequence[int]) -> None:
        super().check_input_size(spatial_shape)
        if self.spatial_dims == 2 and int(spatial_shape[0]) != 1:
            raise ValueError(f"a 2d U-Net takes one slice at a time, (B, C, 1, Y, X); got spatial shape "
                             f"{tuple(int(s) for s in spatial_shape)}")

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        """Encode, decode with skips; return full-resolution features, bottleneck and deep levels."""
        if self.spatial_dims == 2:  # run the 2d blocks on the slice, give every output its slice axis back
            out = self._forward(x[:, :, 0])
            return BackboneOutput(out.decoder[:, :, None], out.bottleneck[:, :, None],
                                  tuple(d[:, :, None] for d in out.deep))
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> BackboneOutput:
        skips = [self.input_block(x)]
        for down in self.downsamples:
            skips.append(down(skips[-1]))
        bottleneck = self.bottleneck(skips[-1])
        decoded = []  # coarsest first
        out = bottleneck
        for up, skip in zip(self.upsamples, reversed(skips)):
            out = up(out, skip)
            decoded.append(out)
        deep = tuple(decoded[-2::-1][: self.deep_levels])
        return BackboneOutput(decoded[-1], bottleneck, deep)


class VNetStage(nn.Module):
    """n x (3x3x3 conv + norm + ReLU) at one resolution; optionally residual like ResidualConvBlock."""

    def __init__(self, n_convs: int, in_channels: int, out_channels: int, norm: str, residual: bool) -> None:
        """A residual stage needs in_channels == out_channels; its last ReLU follows the addition."""
        super().__init__()
        self.residual = residual
        if residual and in_channels != out_channels:
            raise ValueError("a residual V-Net stage needs equal input and output channels")
        layers: list[nn.Module] = []
        for i in range(n_convs):
            layers += [nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1)]
            layers += [make_norm(norm, out_channels)]
            if not (residual and i == n_convs - 1):
                layers += [nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the convolutions (and the residual addition)."""
        if self.residual:
            return torch.relu(self.convs(x) + x)
        return self.convs(x)


def _vnet_resample(in_channels: int, out_channels: int, norm: str, up: bool) -> nn.Sequential:
    """Kernel-2 stride-2 (transposed) conv + norm + ReLU: the V-Net's down/up step."""
    conv = nn.ConvTranspose3d if up else nn.Conv3d
    return nn.Sequential(conv(in_channels, out_channels, 2, stride=2), make_norm(norm, out_channels), nn.ReLU(inplace=True))


class VNetBackbone(Backbone):
    """The V-Net of the VerSemi public code: 4 down / 4 up, additive skips, 1-2-3-3-3 convs per stage.

    As in that code the full-resolution skip is left out (the last up-convolution's output is the
    decoder output; `x8_up + x1` is commented out there) and there is no dropout. Unlike it, norms
    are affine and `residual=True` makes every stage with equal in/out channels residual.
    """

    def __init__(
        self,
        in_channels: int,
        base_filters: int = 16,
        norm: str = "instance",
        residual: bool = False,
        deep_levels: int = 0,
    ) -> None:
        """Stage i has base_filters * 2**i channels."""
        super().__init__()
        if not 0 <= deep_levels <= 3:
            raise ValueError(f"deep_levels must be in [0, 3] for the V-Net; got {deep_levels}")
        widths = [base_filters * 2**i for i in range(5)]
        encoder_inputs = [in_channels] + widths[1:]
        self.encoder_stages = nn.ModuleList(
            VNetStage(n, c_in, w, norm, residual and c_in == w)
            for n, c_in, w in zip(VNET_CONVS_PER_STAGE, encoder_inputs, widths)
        )
        self.downs = nn.ModuleList(_vnet_resample(widths[i], widths[i + 1], norm, up=False) for i in range(4))
        self.ups = nn.ModuleList(_vnet_resample(widths[i + 1], widths[i], norm, up=True) for i in (3, 2, 1, 0))
        self.decoder_stages = nn.ModuleList(
            VNetStage(VNET_CONVS_PER_STAGE[i], widths[i], widths[i], norm, residual) for i in (3, 2, 1)
        )

        self.decoder_channels = tuple(widths[: deep_levels + 1])
        self.bottleneck_channels = widths[4]
        self.divisor = (16, 16, 16)
        self.deep_levels = deep_levels

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        """Encode, decode with additive skips; return full-resolution features, bottleneck, deep levels."""
        skips = []
        h = x
        for stage, down in zip(self.encoder_stages, self.downs):
            h = stage(h)
            skips.append(h)
            h = down(h)
        bottleneck = self.encoder_stages[-1](h)
        decoded = []  # block outputs at 1/8, 1/4, 1/2 resolution
        h = bottleneck
        for up, stage, skip in zip(self.ups, self.decoder_stages, skips[:0:-1]):
            h = stage(up(h) + skip)
            decoded.append(h)
        full_resolution = self.ups[-1](h)  # no skip from the first stage, as in the public code
        deep = tuple(decoded[::-1][: self.deep_levels])
        return BackboneOutput(full_resolution, bottleneck, deep)
