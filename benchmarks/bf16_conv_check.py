"""Which 3D convolutions get a wrong bf16 weight gradient on this CPU, with and without the guard.

    python benchmarks/bf16_conv_check.py [--depths 1 12] [--steps 5]

For kernels 1, 3 and 5 (stride 1), a stride-2 kernel 3 and a stride-2 transposed kernel 2, at 16
and 64 channels and every input depth in ``--depths``, it computes the weight gradient under CPU
bf16 autocast twice, with the freed memory filled differently, and against fp32. A shape is
wrong when the two runs differ or the relative error to fp32 exceeds 5 %. It prints the wrong
depths per kernel, plain ``nn.Conv3d`` against ``versemi.nets.bf16_guard.GuardedConv3d``, then
times ``--steps`` forward and backward passes of the CPU-preset hippocampus network (features
8-16-32-64, batch 4, patch 40x56x40) guarded and plain, as a ratio. Rerun it after a PyTorch
upgrade: the guard can go once the plain column is empty. Not a test.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from versemi.nets import build_network
from versemi.nets.bf16_guard import GuardedConv3d
from versemi.model.precision import cpu_has_bf16

KINDS = {
    "kernel 1": dict(kernel_size=1),
    "kernel 3": dict(kernel_size=3, padding=1),
    "kernel 5": dict(kernel_size=5, padding=2),
    "kernel 3 stride 2": dict(kernel_size=3, stride=2, padding=1),
}


def weight_gradient(conv: nn.Module, x: torch.Tensor, garbage: float | None) -> torch.Tensor:
    if garbage is not None:
        junk = [torch.full((n,), garbage, dtype=d) for n in (10_000, 1_000_000) for d in (torch.float32, torch.bfloat16)]
        del junk
    conv.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=garbage is not None):
        out = conv(x)
    out.float().square().mean().backward()
    return conv.weight.grad.clone()


def wrong(conv: nn.Module, x: torch.Tensor) -> bool:
    first, second, reference = (weight_gradient(conv, x, g) for g in (0.0, 1e30, None))
    error = float((first - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
    return not torch.equal(first, second) or error > 0.05


def sweep(depths: range) -> None:
    torch.manual_seed(0)
    convs = {name: (lambda c, kw=kw: nn.Conv3d(c, c, **kw)) for name, kw in KINDS.items()}
    convs["transposed kernel 2 stride 2"] = lambda c: nn.ConvTranspose3d(c, c, 2, stride=2)
    print(f"{'convolution':<30} {'channels':>8}  wrong depths: plain | guarded")
    for name, make in convs.items():
        for channels in (16, 64):
            plain = make(channels)
            guarded = make(channels)
            guarded.load_state_dict(plain.state_dict())
            if type(guarded) is nn.Conv3d:
                guarded.__class__ = GuardedConv3d
            bad = {"plain": [], "guarded": []}
            # a strided kernel 3 at height 1 aborts the process (double free) in this PyTorch: left out
            for depth in depths:
                for height in (2, 5) if "stride" in name else (1, 2, 5):
                    x = torch.randn(2, channels, depth, height, 4)
                    for label, conv in (("plain", plain), ("guarded", guarded)):
                        if wrong(conv, x) and depth not in bad[label]:
                            bad[label].append(depth)
            print(f"{name:<30} {channels:>8}  {bad['plain'] or '-'} | {bad['guarded'] or '-'}", flush=True)


def step_time(steps: int) -> None:
    plan = {"architecture": "unet", "features": [8, 16, 32, 64], "kernel_sizes": [[3, 3, 3]] * 4,
            "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "context_norm": "group",
            "head_activation": "leaky_relu"}
    x, prompts = torch.randn(4, 1, 40, 56, 40), torch.zeros(4, dtype=torch.long)
    seconds = {}
    for label in ("guarded", "plain"):
        torch.manual_seed(0)
        model = build_network(plan, 1, 2)
        if label == "plain":
            for m in model.modules():
                if type(m) is GuardedConv3d:
                    m.__class__ = nn.Conv3d
        times = []
        for _ in range(steps + 1):  # the first step warms the kernels up
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x, prompts)
            out.float().mean().backward()
            times.append(time.perf_counter() - start)
        seconds[label] = sorted(times[1:])[len(times[1:]) // 2]
        print(f"{label}: median {seconds[label]:.3f} s per forward and backward", flush=True)
    print(f"guarded / plain: {seconds['guarded'] / seconds['plain']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs=2, default=[1, 12], metavar=("FROM", "TO"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8") if line.startswith("model name")]
    print(f"CPU {names[0] if names else 'unknown'}, bf16 units: {'yes' if cpu_has_bf16() else 'no'}, torch "
          f"{torch.__version__}, {args.threads} thread(s)")
    sweep(range(args.depths[0], args.depths[1] + 1))
    step_time(args.steps)


if __name__ == "__main__":
    main()
