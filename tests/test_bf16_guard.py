"""The fp32 fallback for the 3D convolutions whose bf16 weight gradient the CPU kernel gets wrong."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from versemi.nets import build_network
from versemi.nets.bf16_guard import GuardedConv3d, guard_bf16_convolutions


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weight_gradient(conv: nn.Module, x: torch.Tensor, garbage: float) -> torch.Tensor:
    """The weight gradient under CPU bf16 autocast, after freed memory was filled with ``garbage``
    (the faulty kernel reads memory it never wrote, so its result follows what lay there)."""
    junk = [torch.full((n,), garbage, dtype=dtype) for n in (10_000, 1_000_000) for dtype in (torch.float32, torch.bfloat16)]
    del junk
    conv.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    out.float().square().mean().backward()
    return conv.weight.grad.clone()


def test_shallow_input_gets_a_reproducible_fp32_weight_gradient():
    torch.manual_seed(0)
    conv = guard_bf16_convolutions(nn.Sequential(nn.Conv3d(16, 16, 3, padding=1)))[0]
    x = torch.randn(2, 16, 2, 4, 4)  # depth 2 under a kernel 3 deep: the measured faulty case
    first, second = weight_gradient(conv, x, 0.0), weight_gradient(conv, x, 1e30)
    assert torch.equal(first, second)
    conv.zero_grad(set_to_none=True)
    conv(x).square().mean().backward()  # fp32 without autocast
    torch.testing.assert_close(first, conv.weight.grad, rtol=1e-5, atol=1e-7)


def test_only_shallow_stride_one_convolutions_leave_bf16():
    conv = GuardedConv3d(4, 4, 3, padding=1)
    strided = GuardedConv3d(4, 4, 3, stride=2, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(torch.randn(1, 4, 2, 8, 8)).dtype == torch.float32
        assert conv(torch.randn(1, 4, 3, 8, 8)).dtype == torch.bfloat16  # measured right from depth 3
        assert GuardedConv3d(4, 4, 5, padding=2)(torch.randn(1, 4, 16, 8, 8)).dtype == torch.float32
        assert strided(torch.randn(1, 4, 2, 8, 8)).dtype == torch.bfloat16
    assert conv(torch.randn(1, 4, 2, 8, 8)).dtype == torch.float32  # no autocast: untouched


@pytest.mark.parametrize("plan", [
    {"architecture": "unet", "features": [4, 8, 16], "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]]},
    {"architecture": "vnet", "features": [4]},
], ids=["unet", "vnet"])
def test_built_networks_guard_every_3d_convolution_and_keep_their_state_dict(plan):
    model = build_network(plan, in_channels=1, num_prompts=2)
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert convolutions and all(type(m) is GuardedConv3d for m in convolutions)
    unguarded = build_network(plan, in_channels=1, num_prompts=2)
    for m in unguarded.modules():
        if type(m) is GuardedConv3d:
            m.__class__ = nn.Conv3d
    unguarded.load_state_dict(model.state_dict())  # same keys and shapes: old checkpoints load
