"""Tests of versemi.nets: backbones, the dynamic prompt head and the prompted segmenter (tiny nets)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet

from versemi.nets import (
    NUM_HEAD_PARAMS,
    PromptedSegmenter,
    UNetBackbone,
    apply_dynamic_head,
    build_network,
    split_head_params,
)

NUM_PROMPTS = 4
# (B, C, Z, Y, X) = (2, 1, 8, 16, 16): anisotropic first down-sampling, divisor (2, 4, 4).
UNET_PLAN = {
    "architecture": "unet",
    "features": [4, 8, 16],
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
    "norm": "instance",
    "deep_supervision": False,
}
UNET_INPUT = (2, 1, 8, 16, 16)
VNET_PLAN = {"architecture": "vnet", "features": [4], "norm": "instance"}
VNET_INPUT = (2, 1, 32, 32, 32)  # V-Net divisor is 16; 32 keeps the bottleneck above 1 voxel
CASES = [pytest.param(UNET_PLAN, UNET_INPUT, id="unet"), pytest.param(VNET_PLAN, VNET_INPUT, id="vnet")]


def make_model(plan: dict, seed: int = 0) -> PromptedSegmenter:
    """A deterministic tiny segmenter."""
    torch.manual_seed(seed)
    return build_network(plan, in_channels=1, num_prompts=NUM_PROMPTS)


def make_input(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    """A deterministic random image batch."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("plan, shape", CASES)
def test_multi_prompt_call_equals_single_prompt_calls(plan: dict, shape: tuple[int, ...]) -> None:
    model = make_model(plan).eval()
    x = make_input(shape)
    prompts = torch.tensor([[0, 2, 3], [3, 1, 0]])
    with torch.no_grad():
        multi = model(x, prompts)
        for j in range(prompts.shape[1]):
            for k in prompts[:, j].unique():
                single = model(x, torch.full((shape[0],), int(k)))
                rows = prompts[:, j] == k
                torch.testing.assert_close(multi[rows, j], single[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("plan, shape", CASES)
def test_output_shapes(plan: dict, shape: tuple[int, ...]) -> None:
    model = make_model(plan)
    x = make_input(shape)
    batch, _, *spatial = shape
    assert model(x, torch.tensor([0, 3])).shape == (batch, 2, *spatial)
    assert model(x, torch.tensor([[0, 1, 2], [3, 3, 0]])).shape == (batch, 3, 2, *spatial)
    assert model(x, torch.tensor([[1], [2]])).shape == (batch, 1, 2, *spatial)


def test_controller_generates_162_parameters_per_sample_and_prompt() -> None:
    model = make_model(UNET_PLAN)
    assert NUM_HEAD_PARAMS == 64 + 64 + 16 + 8 + 8 + 2 == 162
    assert model.prompt_head.controller.linear.out_features == 162
    assert model.prompt_head.controller.linear.in_features == UNET_PLAN["features"][-1] + NUM_PROMPTS
    feats = model.features(make_input(UNET_INPUT))
    assert model.head_params(feats, torch.tensor([[0, 1, 2], [3, 2, 1]])).shape == (2, 3, 162)
    assert model.head_params(feats, torch.tensor([0, 1])).shape == (2, 162)


def test_dynamic_head_matches_public_grouped_convolution() -> None:
    """The matmul head equals the public code's parse_dynamic_params + grouped conv3d."""
    gen = torch.Generator().manual_seed(0)
    batch, prompts, spatial = 2, 3, (3, 4, 5)
    precls = torch.randn(batch, 8, *spatial, generator=gen)
    params = torch.randn(batch, prompts, NUM_HEAD_PARAMS, generator=gen)
    ours = apply_dynamic_head(precls, params)
    for k in range(prompts):
        p = params[:, k]
        weights = list(torch.split(p, [64, 64, 16, 8, 8, 2], dim=1))
        layers = [(weights[0], weights[3], 8), (weights[1], weights[4], 8), (weights[2], weights[5], 2)]
        h = precls.reshape(1, -1, *spatial)
        for i, (w, b, out) in enumerate(layers):
            h = F.conv3d(h, w.reshape(batch * out, -1, 1, 1, 1), b.reshape(batch * out), groups=batch)
            h = F.relu(h) if i < 2 else h
        torch.testing.assert_close(ours[:, k], h.reshape(batch, 2, *spatial), rtol=1e-5, atol=1e-5)
    w1, b1 = split_head_params(params)[0]
    assert w1.shape == (batch, prompts, 8, 8) and b1.shape == (batch, prompts, 8)


@pytest.mark.parametrize("slope", [0.0, 0.01])
def test_dynamic_head_hidden_activation_has_the_given_negative_slope(slope: float) -> None:
    """Every hidden unit negative: a ReLU head outputs its last bias, a leaky one still reads the input."""
    gen = torch.Generator().manual_seed(0)
    precls = torch.rand(1, 8, 2, 3, 4, generator=gen)  # non-negative features
    w1 = -torch.rand(8, 8, generator=gen)  # every first-layer unit < 0
    b3 = torch.tensor([0.5, -0.5])
    # the public layout: weights (row-major), then biases
    layout = [w1.flatten(), torch.eye(8).flatten(), torch.ones(2, 8).flatten(), torch.zeros(8), torch.zeros(8), b3]
    params = torch.cat(layout).view(1, 1, NUM_HEAD_PARAMS).requires_grad_(True)
    logits = apply_dynamic_head(precls, params, slope)
    hidden = torch.einsum("oi,bizyx->bozyx", w1, precls)
    expected = slope * slope * hidden.sum(1, keepdim=True) + b3.view(1, 2, 1, 1, 1)
    torch.testing.assert_close(logits[:, 0], expected.expand(1, 2, 2, 3, 4))
    logits[:, 0, 1].sum().backward()
    first_layer_grad = split_head_params(params.grad)[0][0]
    assert (first_layer_grad.abs().sum() > 0) == (slope > 0)  # a dead ReLU head passes no gradient back


@pytest.mark.parametrize("plan, shape", CASES)
def test_backbone_runs_once_and_does_not_depend_on_the_prompt(plan: dict, shape: tuple[int, ...]) -> None:
    model = make_model(plan)
    x = make_input(shape)
    captured = []
    model.backbone.register_forward_hook(lambda _m, _i, out: captured.append(out))
    model(x, torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]))
    model(x, torch.tensor([1, 1]))
    assert len(captured) == 2  # one backbone pass per forward, whatever the number of prompts
    torch.testing.assert_close(captured[0].decoder, captured[1].decoder, rtol=0, atol=0)
    torch.testing.assert_close(captured[0].bottleneck, captured[1].bottleneck, rtol=0, atol=0)
    # The one-hot prompt enters only through the controller's linear map: no path from it to the features.
    feats = model.features(x)
    linear = model.prompt_head.controller.linear
    grads = torch.autograd.grad(
        feats.precls.sum() + feats.context.sum(), [linear.weight, linear.bias], allow_unused=True
    )
    assert all(g is None for g in grads)


@pytest.mark.parametrize("plan, shape", CASES)
def test_gradient_reaches_backbone_and_controller(plan: dict, shape: tuple[int, ...]) -> None:
    model = make_model(plan).train()
    logits = model(make_input(shape), torch.tensor([[0, 1], [1, 0]]))
    F.cross_entropy(logits.flatten(0, 1), torch.randint(0, 2, (4, *shape[2:]))).backward()
    first_conv = next(model.backbone.parameters())
    linear = model.prompt_head.controller.linear
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    onehot_grad = linear.weight.grad[:, -NUM_PROMPTS:]
    assert onehot_grad[:, :2].abs().sum() > 0
    assert onehot_grad[:, 2:].abs().sum() == 0  # prompts 2 and 3 were not used


def test_features_and_head_reuse_one_backbone_pass() -> None:
    model = make_model(UNET_PLAN).eval()
    x = make_input(UNET_INPUT)
    with torch.no_grad():
        feats = model.features(x)
        torch.testing.assert_close(model.head(feats, torch.tensor([2, 0])), model(x, torch.tensor([2, 0])))


@pytest.mark.parametrize(
    "plan, shape, divisor",
    [
        pytest.param(UNET_PLAN, (1, 1, 8, 16, 10), "(2, 4, 4)", id="unet"),
        pytest.param(VNET_PLAN, (1, 1, 32, 24, 32), "(16, 16, 16)", id="vnet"),
    ],
)
def test_wrong_input_size_names_the_divisor(plan: dict, shape: tuple[int, ...], divisor: str) -> None:
    model = make_model(plan)
    with pytest.raises(ValueError, match=f"divisible by {divisor}".replace("(", r"\(").replace(")", r"\)")):
        model(torch.zeros(shape), torch.tensor([0]))


def test_bad_prompts_and_plans_are_rejected() -> None:
    model = make_model(UNET_PLAN)
    x = make_input(UNET_INPUT)
    with pytest.raises(ValueError, match="prompt indices"):
        model(x, torch.tensor([0, NUM_PROMPTS]))
    with pytest.raises(ValueError, match="shape"):
        model(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        model(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="architecture"):
        build_network({**UNET_PLAN, "architecture": "transformer"}, 1, NUM_PROMPTS)
    with pytest.raises(ValueError, match="strides\\[0\\]"):
        build_network({**UNET_PLAN, "strides": [[2, 2, 2]] * 3}, 1, NUM_PROMPTS)
    with pytest.raises(ValueError, match="kernel_sizes"):
        build_network({k: v for k, v in UNET_PLAN.items() if k != "kernel_sizes"}, 1, NUM_PROMPTS)


@pytest.mark.parametrize(
    "plan, shape",
    [
        pytest.param({**UNET_PLAN, "features": [4, 8, 8, 16], "kernel_sizes": [[3, 3, 3]] * 4,
                      "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]}, (2, 1, 8, 16, 16), id="unet"),
        pytest.param(VNET_PLAN, VNET_INPUT, id="vnet"),
    ],
)
def test_deep_supervision_returns_lower_resolution_logits(plan: dict, shape: tuple[int, ...]) -> None:
    model = make_model({**plan, "deep_supervision": True}).train()
    x = make_input(shape)
    batch, _, *spatial = shape
    outputs = model(x, torch.tensor([[0, 1], [2, 3]]))
    assert isinstance(outputs, list) and len(outputs) == model.backbone.deep_levels + 1 >= 2
    assert outputs[0].shape == (batch, 2, 2, *spatial)
    for finer, coarser in zip(outputs, outputs[1:]):
        assert coarser.shape[:3] == (batch, 2, 2)
        assert all(c < f or c == f == spatial[0] for c, f in zip(coarser.shape[3:], finer.shape[3:]))
    assert model(x, torch.tensor([0, 1]))[1].shape[:2] == (batch, 2)
    assert isinstance(model.eval()(x, torch.tensor([0, 1])), torch.Tensor)  # full resolution only at inference


def test_unet_backbone_matches_dynunet_decoder() -> None:
    """Our forward over DynUNet's blocks reproduces DynUNet's own decoder output."""
    kwargs = dict(kernel_size=UNET_PLAN["kernel_sizes"], strides=UNET_PLAN["strides"])
    torch.manual_seed(3)
    reference = DynUNet(3, 1, 1, upsample_kernel_size=UNET_PLAN["strides"][1:], filters=UNET_PLAN["features"],
                        norm_name=("INSTANCE", {"affine": True}), **kwargs)
    torch.manual_seed(3)
    backbone = UNetBackbone(1, UNET_PLAN["features"], UNET_PLAN["kernel_sizes"], UNET_PLAN["strides"])
    x = make_input(UNET_INPUT)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x).decoder, reference.skip_layers(x))
    assert backbone.divisor == (2, 4, 4)
    assert backbone(x).bottleneck.shape == (2, 16, 4, 4, 4)
