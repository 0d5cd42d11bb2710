"""One U-Net training step in fp32 and under bf16 autocast, interleaved, on this machine's CPU.

    python benchmarks/precision_step.py [--threads 1] [--steps 3] [--rounds 2]

The network and patch of benchmarks/la_budget.py's first setting (DynUNet 16..128, patch
40x64x80, batch 2, Dice + CE, Adam). Prints the median seconds per step of each precision, their
ratio, and whether the CPU has native bf16 units (what ``--precision auto`` decides on). Not a test.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from versemi.nets import build_network
from versemi.training.losses import DiceCE
from versemi.model.precision import cpu_has_bf16

PLAN = {"architecture": "unet", "features": [16, 32, 64, 128, 128], "kernel_sizes": [[3, 3, 3]] * 5,
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], "norm": "instance",
        "context_norm": "group"}
PATCH = (40, 64, 80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per precision and round")
    parser.add_argument("--rounds", type=int, default=2, help="fp32 / bf16 alternations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_network(PLAN, 1, 2)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    loss = DiceCE()
    x = torch.randn(2, 1, *PATCH)
    target = (torch.rand(2, 1, *PATCH) > 0.5).float()
    prompts = torch.tensor([0, 0])
    times = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for name in times:
            for _ in range(args.steps):
                started = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                    value = loss(net(x, prompts), target)
                value.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times[name].append(time.perf_counter() - started)
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    print(f"CPU with native bf16 units (amx_bf16 / avx512_bf16): {cpu_has_bf16()}; {args.threads} thread(s)")
    for name, values in times.items():
        print(f"  {name}: median {statistics.median(values):.2f} s/step  ({', '.join(f'{v:.2f}' for v in values)})")
    print(f"  bf16 / fp32 time: {bf16 / fp32:.2f}x ({'bf16 faster' if bf16 < fp32 else 'bf16 slower'})")


if __name__ == "__main__":
    main()
