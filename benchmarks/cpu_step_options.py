"""One U-Net training step on this CPU under the options that might make it faster: eager PyTorch
at the default precision (``--precision auto``), fp32, channels-last memory format,
``torch.compile`` (inductor), and every core's thread instead of ``--threads``, each against the
default in the same run.

    python benchmarks/cpu_step_options.py [--threads 1] [--steps 4] [--rounds 2] [--skip-compile]

The network, patch and batch of benchmarks/precision_step.py (DynUNet 16..128, patch 40x64x80,
batch 2, Dice + CE, Adam), which is the LA budget's first setting. Every option starts from the
same weights and trains on the same batch: their losses over the first steps are printed beside
the default's (they must agree to bf16 rounding). Steps are timed interleaved, option after option
in each round, so load from other processes hits them alike; the compile time (the first steps of
the compiled option, before the timed ones) is printed apart, with the number of steps it takes
to pay back. Inter-op threads are not an option: an eager training step runs its operators one
after another (autograd on the CPU uses the calling thread), so only the intra-op count matters.
Not a test.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from versemi.model.precision import autocast_dtype, cpu_has_bf16
from versemi.nets import build_network
from versemi.training.losses import DiceCE

from precision_step import PATCH, PLAN


class Option:
    """A way to run the step: its network copy, optimizer, autocast dtype and input layout."""

    def __init__(self, name: str, network: torch.nn.Module, dtype: torch.dtype | None, channels_last: bool = False,
                 compiled: bool = False, threads: int = 1) -> None:
        self.name, self.dtype, self.channels_last, self.threads = name, dtype, channels_last, threads
        self.network = copy.deepcopy(network)
        if channels_last:
            self.network = self.network.to(memory_format=torch.channels_last_3d)
        self.optimizer = torch.optim.Adam(self.network.parameters(), 1e-3)
        self.forward = torch.compile(self.network) if compiled else self.network
        self.loss = DiceCE()
        self.times: list[float] = []
        self.losses: list[float] = []
        self.setup_seconds = 0.0

    def step(self, x: torch.Tensor, target: torch.Tensor, prompts: torch.Tensor) -> float:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        torch.set_num_threads(self.threads)
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            value = self.loss(self.forward(x, prompts), target)
        value.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        self.losses.append(float(value.detach()))
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per option and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile-steps", type=int, default=2, help="untimed first steps of the compiled option")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    network = build_network(PLAN, 1, 2)
    x = torch.randn(2, 1, *PATCH)
    target = (torch.rand(2, 1, *PATCH) > 0.5).float()
    prompts = torch.tensor([0, 0])
    default = autocast_dtype("auto", True, torch.device("cpu"))
    options = [Option(f"default ({'bf16' if default else 'fp32'})", network, default, threads=args.threads)]
    if default is not None:
        options.append(Option("fp32", network, None, threads=args.threads))
    options.append(Option("channels-last", network, default, channels_last=True, threads=args.threads))
    if cores > args.threads:  # what one run gets alone on this machine (torch's own default count)
        options.append(Option(f"{cores} threads", network, default, threads=cores))
    if not args.skip_compile:
        compiled = Option("torch.compile", network, default, compiled=True, threads=args.threads)
        started = time.perf_counter()
        for _ in range(args.compile_steps):
            compiled.step(x, target, prompts)
        compiled.setup_seconds = time.perf_counter() - started
        options.append(compiled)
    for option in options:  # the same untimed first steps for every other option, so losses line up
        if option.setup_seconds == 0.0:
            for _ in range(args.compile_steps):
                option.step(x, target, prompts)
    for _ in range(args.rounds):
        for option in options:
            option.times += [option.step(x, target, prompts) for _ in range(args.steps)]

    reference = statistics.median(options[0].times)
    print(f"CPU with native bf16 units: {cpu_has_bf16()}; {args.threads} thread(s) of {cores} cores; torch {torch.__version__}; "
          f"DynUNet 16..128, patch {'x'.join(map(str, PATCH))}, batch 2")
    print("| option | median s/step | speed vs default | losses of the first steps | compile s | steps to pay back |")
    print("|---|---|---|---|---|---|")
    for option in options:
        median = statistics.median(option.times)
        saved = reference - median
        compile_seconds = max(0.0, option.setup_seconds - args.compile_steps * median)  # beyond its own steps
        payback = f"{compile_seconds / saved:.0f}" if option.setup_seconds and saved > 0 else (
            "never" if option.setup_seconds else "")
        losses = ", ".join(f"{v:.4f}" for v in option.losses[:4])
        setup = f"{max(0.0, option.setup_seconds - args.compile_steps * median):.0f}" if option.setup_seconds else ""
        print(f"| {option.name} | {median:.3f} | {reference / median:.2f}x | {losses} | {setup} | {payback} |")


if __name__ == "__main__":
    main()
