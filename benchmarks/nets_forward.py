"""Benchmark: all K prompts from ONE backbone pass versus K full passes (the public code's way).

One training step = forward + backward of a cross-entropy over the logits of K prompts, for an
nnU-Net-style U-Net (features 32..320, four 2x2x2 down-samplings). Each mode runs in its own
subprocess so that its peak memory (max RSS on CPU, max allocated on CUDA) is its own; the
timing runs the two modes interleaved in one process, so that load from other processes on a
shared machine hits both alike (the minimum is then the steadier figure).

    python benchmarks/nets_forward.py                 # defaults: patch 64^3, batch 2, K = 3
    python benchmarks/nets_forward.py --device cuda --patch 96
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from versemi.nets import PromptedSegmenter, build_network

NETWORK_PLAN = {
    "architecture": "unet",
    "features": [32, 64, 128, 256, 320],
    "kernel_sizes": [[3, 3, 3]] * 5,
    "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4,
    "norm": "instance",
    "deep_supervision": False,
}
MODES = ("shared", "separate")


def shared_step(model: PromptedSegmenter, x: torch.Tensor, target: torch.Tensor, prompts: int) -> None:
    """One backbone pass, K generated heads, one backward."""
    all_prompts = torch.arange(prompts, device=x.device).expand(x.shape[0], -1)
    logits = model(x, all_prompts)  # (B, K, 2, *S)
    F.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1)).backward()


def separate_step(model: PromptedSegmenter, x: torch.Tensor, target: torch.Tensor, prompts: int) -> None:
    """K full forward passes, one per prompt, one backward (as the public VerSemi code does)."""
    loss = 0.0
    for k in range(prompts):
        logits = model(x, torch.full((x.shape[0],), k, device=x.device))
        loss = loss + F.cross_entropy(logits, target[:, k]) / prompts
    loss.backward()


STEPS = {"shared": shared_step, "separate": separate_step}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(args: argparse.Namespace) -> tuple[PromptedSegmenter, torch.Tensor, torch.Tensor]:
    """The benchmarked U-Net, an input batch and K binary targets per sample."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_network(NETWORK_PLAN, in_channels=1, num_prompts=args.prompts).to(device).train()
    x = torch.randn(args.batch, 1, *(args.patch,) * 3, device=device)
    target = torch.randint(0, 2, (args.batch, args.prompts, *(args.patch,) * 3), device=device)
    return model, x, target


def timed_step(mode: str, model: PromptedSegmenter, x: torch.Tensor, target: torch.Tensor, prompts: int) -> float:
    """Wall-clock seconds of one training step of the given mode."""
    model.zero_grad(set_to_none=True)
    synchronize(x.device)
    start = time.perf_counter()
    STEPS[mode](model, x, target, prompts)
    synchronize(x.device)
    return time.perf_counter() - start


def measure_times(args: argparse.Namespace) -> dict[str, list[float]]:
    """Step times of both modes, interleaved so that load from other processes hits both alike."""
    model, x, target = setup(args)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(args.warmup + args.repeats):
        for mode in MODES:
            seconds = timed_step(mode, model, x, target, args.prompts)
            if i >= args.warmup:
                times[mode].append(seconds)
    return times


def measure_memory(mode: str, args: argparse.Namespace) -> dict[str, float]:
    """Peak memory of two steps of one mode, run alone in this (fresh) process."""
    model, x, target = setup(args)
    figures = {"rss_before_steps_mib": max_rss_mib()}
    if x.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(x.device)
    for _ in range(2):
        timed_step(mode, model, x, target, args.prompts)
    figures["max_rss_mib"] = max_rss_mib()
    if x.device.type == "cuda":
        figures["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(x.device) / 2**20
    return figures


def memory_in_subprocess(mode: str, argv: list[str]) -> dict[str, float]:
    """Run one mode in a fresh interpreter so that its peak memory is its own."""
    done = subprocess.run([sys.executable, __file__, *argv, "--mode", mode], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(times: dict[str, list[float]], memory: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    """Print both modes, the time ratios and the memory figures."""
    print(
        f"U-Net features {NETWORK_PLAN['features']}, patch {args.patch}^3, batch {args.batch}, K={args.prompts} prompts, "
        f"device {args.device}, torch threads {torch.get_num_threads()}; "
        f"{args.repeats} interleaved forward+backward steps per mode after {args.warmup} warm-up"
    )
    for mode in MODES:
        t, m = times[mode], memory[mode]
        line = (
            f"  {mode:>8}: median {statistics.median(t):.3f} s/step, min {min(t):.3f} "
            f"(runs {', '.join(f'{s:.2f}' for s in t)}); peak RSS {m['max_rss_mib']:.0f} MiB "
            f"(+{m['max_rss_mib'] - m['rss_before_steps_mib']:.0f} MiB during steps)"
        )
        if "cuda_peak_allocated_mib" in m:
            line += f"; CUDA peak allocated {m['cuda_peak_allocated_mib']:.0f} MiB"
        print(line)
    shared, separate = times["shared"], times["separate"]
    print(
        f"  time ratio separate/shared: median {statistics.median(separate) / statistics.median(shared):.2f}x, "
        f"min {min(separate) / min(shared):.2f}x"
    )
    growth = {mode: memory[mode]["max_rss_mib"] - memory[mode]["rss_before_steps_mib"] for mode in MODES}
    print(f"  peak RSS growth ratio separate/shared: {growth['separate'] / growth['shared']:.2f}x")
    if "cuda_peak_allocated_mib" in memory["shared"]:
        ratio = memory["separate"]["cuda_peak_allocated_mib"] / memory["shared"]["cuda_peak_allocated_mib"]
        print(f"  CUDA peak memory ratio separate/shared: {ratio:.2f}x")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line settings."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, default=64, help="cubic patch side (multiple of 16)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=3, help="K, prompts computed per image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=MODES, help="internal: measure one mode's peak memory and print JSON")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    """Memory of each mode in its own subprocess, then interleaved timing here; print the report."""
    args = parse_args(argv)
    if args.mode:
        print(json.dumps(measure_memory(args.mode, args)))
        return
    memory = {mode: memory_in_subprocess(mode, argv) for mode in MODES}
    report(measure_times(args), memory, args)


if __name__ == "__main__":
    main(sys.argv[1:])
