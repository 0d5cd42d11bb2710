"""Benchmark: can the data loader feed the training step?

On a real preprocessing cache (the two demo datasets DemoLA + DemoPancreas, made under --root on
first use with versemi_make_synthetic and versemi_plan_and_preprocess) this measures:
  1. augmented batches per second of the labeled and the unlabeled stream (CaseStore + BatchSource,
     default AugmentationSettings, fold 0), in-process (0 workers) and through ``batch_loader`` with
     1 and 2 worker processes, for the plan's patch and batch size and for 64^3 batch 2;
  2. one VerSemi stage-2 training step (forward + backward of the plan's U-Net, re-derived for the
     patch size as the trainer does) on a labeled + an unlabeled batch of that shape;
  3. workers needed per stream = ceil(seconds per batch of one worker / step time), for this CPU's
     step and, as an extrapolation, for a step 50x faster (GPU).
Worker rates are steady-state: counted from the moment every worker has delivered its first batch.

    python benchmarks/data_loader.py                     # cache in /tmp/bench_dl, 12 batches per rate
    python benchmarks/data_loader.py --root /tmp/bench_dl --batches 20 --gpu-speedup 50
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from versemi.atomic import read_json
from versemi.nets import build_network
from versemi.plans.experiment import plans_path
from versemi.plans.planner import CONFIGURATION
from versemi.plans.topology import pool_and_conv_props
from versemi.model.augmentation_settings import AugmentationSettings
from versemi.training.data import BatchSource, CaseStore, StreamSettings, batch_loader
from versemi.training.trainer import fold_split

sys.path.insert(0, str(Path(__file__).parent))
from train_step import make_trainer  # noqa: E402  (the same stage-2 trainer stand-in)

DATASETS = ["DemoLA", "DemoPancreas"]
EXPERIMENT = "_".join(DATASETS)
WORKER_COUNTS = (1, 2)
STREAMS = ("labeled", "unlabeled")


def ensure_cache(root: Path) -> tuple[dict, Path]:
    """The demo experiment's plans and plans root; generated and preprocessed when missing."""
    plans_root = root / "versemi_plans"
    if not plans_path(plans_root, EXPERIMENT).is_file():
        env = {**os.environ, "VERSEMI_ROOT": str(root)}
        bin_dir = Path(sys.executable).parent
        for command in (["versemi_make_synthetic"], ["versemi_plan_and_preprocess", "-d", *DATASETS, "--quiet"]):
            print("$ VERSEMI_ROOT=" + str(root), " ".join(command), flush=True)
            subprocess.run([str(bin_dir / command[0]), *command[1:]], env=env, check=True)
    return read_json(plans_path(plans_root, EXPERIMENT)), plans_root


def make_sources(plans: dict, plans_root: Path, patch: list[int], batch: int) -> dict[str, BatchSource]:
    """Augmented labeled and unlabeled streams of fold 0, as the trainer builds them."""
    split = fold_split(plans, "0")
    keys = {"labeled": split["train_labeled"], "unlabeled": split["train_unlabeled"]}
    store = CaseStore(plans, plans_root, CONFIGURATION, keys["labeled"] + keys["unlabeled"])
    return {stream: BatchSource(store, keys[stream], plans,
                                StreamSettings(batch, patch, stream == "labeled", 0.33, AugmentationSettings()),
                                seed=0, stream=stream)
            for stream in STREAMS}


def in_process_rate(source: BatchSource, batches: int) -> float:
    """Batches per second made in this process (after one warm-up batch that opens the files)."""
    source[batches]  # warm-up, outside the measured range
    start = time.perf_counter()
    for i in range(batches):
        source[i]
    return batches / (time.perf_counter() - start)


def worker_rate(source: BatchSource, batches: int, workers: int) -> float:
    """Steady-state batches per second of ``batch_loader`` with ``workers`` background processes."""
    arrivals = [time.perf_counter() for _ in batch_loader(source, 0, batches + workers, workers)]
    return batches / (arrivals[-1] - arrivals[workers - 1])


def loader_rates(sources: dict[str, BatchSource], batches: int) -> dict[str, dict[int, float]]:
    """Rates per stream and worker count (0 = in-process)."""
    rates = {}
    for stream, source in sources.items():
        rates[stream] = {0: in_process_rate(source, batches)}
        for workers in WORKER_COUNTS:
            rates[stream][workers] = worker_rate(source, batches, workers)
    return rates


def network_plan(plans: dict, patch: list[int]) -> dict:
    """The plan's network, with the topology re-derived for another patch size (as Trainer does)."""
    plan = plans["configurations"][CONFIGURATION]
    network = dict(plan["network"])
    if list(patch) != list(plan["patch_size"]):
        topology = pool_and_conv_props(plan["topology_spacing"], patch)
        network.update(strides=topology.strides, kernel_sizes=topology.kernel_sizes, features=topology.features)
    return network


def step_time(plans: dict, sources: dict[str, BatchSource], patch: list[int], repeats: int) -> tuple[list[float], dict]:
    """Seconds of VerSemi stage-2 forward + backward steps on real batches (after 1 warm-up)."""
    torch.manual_seed(0)
    network = network_plan(plans, patch)
    model = build_network(network, plans["in_channels"], plans["num_prompts"]).train()
    trainer = make_trainer(model, patch, plans["num_prompts"])
    assert trainer.synthetic_prompt == plans["synthetic_prompt"]
    labeled, unlabeled = sources["labeled"][0], sources["unlabeled"][0]
    times = []
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        trainer.train_step(labeled, unlabeled)["loss"].backward()
        times.append(time.perf_counter() - start)
    return times[1:], network


def workers_needed(batches_per_s_one_worker: float, step_seconds: float) -> int:
    """Workers a stream needs so that it delivers one batch per step."""
    return math.ceil((1 / batches_per_s_one_worker) / step_seconds)


def report(name: str, patch: list[int], batch: int, rates: dict, steps: list[float], network: dict,
           speedup: float) -> None:
    """Rates, the step time and the workers needed (from the fastest step: the most demanding case),
    for this CPU and extrapolated to a GPU."""
    print(f"\n== {name}: patch {patch}, batch {batch} (labeled and unlabeled), augmentation on ==")
    print(f"  {'stream':<10} {'0 workers':>10} {'1 worker':>10} {'2 workers':>10}  batches/s  (s/batch in-process "
          f"= per worker)")
    for stream in STREAMS:
        r = rates[stream]
        print(f"  {stream:<10} {r[0]:>10.2f} {r[1]:>10.2f} {r[2]:>10.2f}             ({1 / r[0]:.3f})")
    step = min(steps)
    print(f"  VerSemi stage-2 step (forward+backward, U-Net features {network['features']}) on this CPU: "
          f"median {statistics.median(steps):.2f} s, min {step:.2f} s (runs {', '.join(f'{t:.2f}' for t in steps)})")
    gpu_step = step / speedup
    for label, seconds in (("this CPU", step), (f"EXTRAPOLATION: GPU step {speedup:g}x faster = {gpu_step * 1e3:.0f} ms",
                                                gpu_step)):
        need = {stream: workers_needed(rates[stream][0], seconds) for stream in STREAMS}
        print(f"  workers needed, {label}: labeled {need['labeled']}, unlabeled {need['unlabeled']} "
              f"(total {sum(need.values())} loader processes)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/bench_dl"), help="VERSEMI_ROOT of the demo cache")
    parser.add_argument("--batches", type=int, default=12, help="batches per rate measurement")
    parser.add_argument("--repeats", type=int, default=3, help="timed training steps (after 1 warm-up)")
    parser.add_argument("--gpu-speedup", type=float, default=50.0, help="assumed GPU/CPU step speed ratio")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    plans, plans_root = ensure_cache(args.root)
    plan = plans["configurations"][CONFIGURATION]
    print(f"experiment {EXPERIMENT}: plan patch {plan['patch_size']}, batch {plan['batch_size']}; "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; {args.batches} batches per rate")
    for name, patch, batch in (("plan", list(plan["patch_size"]), plan["batch_size"]), ("64^3", [64] * 3, 2)):
        sources = make_sources(plans, plans_root, patch, batch)
        rates = loader_rates(sources, args.batches)
        steps, network = step_time(plans, sources, patch, args.repeats)
        report(name, patch, batch, rates, steps, network, args.gpu_speedup)


if __name__ == "__main__":
    main(sys.argv[1:])
