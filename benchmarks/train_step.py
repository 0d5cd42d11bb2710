"""Benchmark: one VerSemi stage-2 training step, ours versus the public code's schedule, and
versus a supervised step of the same network and patch.

Both compute the SAME loss terms on the SAME weights, batch and CutMix boxes:
  (a) ours: ``VerSemiTrainer.train_step``, i.e. ONE backbone pass over the three distinct images
      (labeled L, CutMix of L's halves, L pasted into unlabeled U) with every prompt's head;
  (b) public: one full network call per (prompt, image set) pair, as the public VerSemi code does:
      L with its own prompts, the CutMix image with the synthetic prompt, with a's and b's prompts,
      the pasted image once per real task and once with the synthetic prompt (7 passes for K = 3).
  (c) supervised: Dice + CE of the labeled batch with its own prompts (SupervisedTrainer's step).
The script first checks that every loss term and the gradients of a few parameters of (a) and (b)
agree, then times forward + backward of each mode (interleaved, so that load from other processes hits both
alike) and measures each mode's peak memory in its own subprocess (max RSS on CPU, max allocated
on CUDA).

    python benchmarks/train_step.py                          # U-Net 32..320, patch 64^3, batch 2+2, K = 3
    python benchmarks/train_step.py --architecture vnet      # the paper's V-Net
    python benchmarks/train_step.py --device cuda [--amp]    # the check itself always runs in fp32
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from versemi.nets import build_network
from versemi.model.config import TrainingConfig
from versemi.training.mixing import box_mask, mix, shuffled
from versemi.training.losses import DiceCE, foreground_probability, soft_dice_loss
from versemi.training.trainers.versemi import DEFAULTS, VerSemiTrainer

NETWORK_PLANS = {
    "unet": {"architecture": "unet", "features": [32, 64, 128, 256, 320], "kernel_sizes": [[3, 3, 3]] * 5,
             "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4, "norm": "instance", "context_norm": "group",
             "deep_supervision": False},
    "vnet": {"architecture": "vnet", "features": [16], "norm": "instance", "context_norm": "group",
             "deep_supervision": False},
}
MODES = ("ours", "public", "supervised")
STEP_SEED = 1234  # reseeded before every step: both modes draw the same ratio and boxes


def make_trainer(model: torch.nn.Module, patch_size: list[int], num_prompts: int) -> VerSemiTrainer:
    """A VerSemiTrainer holding just what ``train_step`` reads (no plans, no data), in stage 2."""
    trainer = object.__new__(VerSemiTrainer)
    trainer.network = trainer.model = model
    trainer.num_prompts, trainer.synthetic_prompt = num_prompts, num_prompts - 1
    trainer.real_prompts = list(range(num_prompts - 1))
    trainer.patch_size, trainer.loss = list(patch_size), DiceCE()
    trainer.config, trainer.epoch = TrainingConfig(epochs=10), 5  # stage 1 = epochs 0-2; ramp-up done
    trainer.settings = dict(DEFAULTS)
    assert trainer.stage == 2
    return trainer


def make_batches(batch: int, patch: int, num_prompts: int, device: torch.device) -> tuple[dict, dict]:
    """Random images; labeled samples get a ball of foreground and alternating real prompts."""
    g = torch.Generator().manual_seed(0)
    shape = (batch, 1, patch, patch, patch)
    grid = torch.stack(torch.meshgrid(*[torch.arange(patch, dtype=torch.float32)] * 3, indexing="ij"))
    radius = torch.rand(batch, generator=g) * patch / 4 + patch / 8
    centre = torch.rand(batch, 3, generator=g) * patch / 2 + patch / 4
    distance = ((grid[None] - centre[:, :, None, None, None]) ** 2).sum(1, keepdim=True).sqrt()
    target = (distance < radius.view(-1, 1, 1, 1, 1)).float()
    labeled = {"data": torch.randn(shape, generator=g) + target, "target": target, "foreground": target,
               "prompt": torch.arange(batch) % (num_prompts - 1)}  # a and b halves: different tasks
    unlabeled = {"data": torch.randn(shape, generator=g)}
    move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return move(labeled), move(unlabeled)


def draw_masks(trainer: VerSemiTrainer, x: torch.Tensor, unlabeled: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The stage-2 ratio, CutMix box and paste box, drawn in the order ``train_step`` draws them."""
    low, high = trainer.settings["stage2_box_ratio"]
    ratio = float(torch.empty(1).uniform_(low, high))
    mask = box_mask(x.shape[0] // 2, trainer.patch_size, ratio, device=x.device)
    paste = box_mask(min(x.shape[0], unlabeled["data"].shape[0]), trainer.patch_size, ratio, device=x.device)
    return mask, paste


def public_step(trainer: VerSemiTrainer, labeled: dict, unlabeled: dict) -> dict[str, torch.Tensor]:
    """(b): the same terms from one full ``model(x, prompts of shape (B,))`` call per prompt and image set."""
    s, net = trainer.settings, trainer.network
    labeled = shuffled(labeled)  # the same seeded order as train_step (the public code does not shuffle)
    x, fg, target, prompt = labeled["data"], labeled["foreground"], labeled["target"], labeled["prompt"]
    half = x.shape[0] // 2
    a, b = slice(0, half), slice(half, 2 * half)
    mask, paste = draw_masks(trainer, x, unlabeled)
    n = paste.shape[0]
    mixed, pasted = mix(x[a], x[b], mask), mix(unlabeled["data"][:n], x[:n], paste)
    every = lambda batch, k: torch.full((batch,), k, device=x.device)  # noqa: E731
    prob = lambda logits: foreground_probability(logits)[:, None]  # noqa: E731

    terms = {"supervised": trainer.loss(net(x, prompt), target)}                                  # pass 1
    synthetic_mixed = prob(net(mixed, every(half, trainer.synthetic_prompt)))                     # pass 2
    terms["synthetic"] = s["weight_synthetic"] * soft_dice_loss(synthetic_mixed, mix(fg[a], fg[b], mask))
    prob_a, prob_b = prob(net(mixed, prompt[a])), prob(net(mixed, prompt[b]))                     # passes 3, 4
    same = (prompt[a] == prompt[b]).float().view(-1, 1, 1, 1, 1)
    mixed_target = mix(target[a], target[b], mask)
    task_a = soft_dice_loss(prob_a, mixed_target, same + (1 - same) * (1 - mask))
    task_b = soft_dice_loss(prob_b, mixed_target, same + (1 - same) * mask)
    terms["task_mix"] = s["weight_task_mix"] * (task_a + task_b) / 2

    tasks = [prob(net(pasted, every(n, k))) for k in trainer.real_prompts]                         # one per task
    synthetic = prob(net(pasted, every(n, trainer.synthetic_prompt)))                             # last pass
    aggregate = torch.cat(tasks, 1).amax(1, keepdim=True).clamp(0, 1)
    if s["detach_aggregate"]:
        aggregate = aggregate.detach()
    terms["consistency"] = trainer.consistency_weight() * soft_dice_loss(synthetic, aggregate)
    terms["box"] = s["weight_box"] * soft_dice_loss(synthetic, fg[:n], paste)
    terms["loss"] = sum(terms.values())
    return terms


def supervised_step(trainer: VerSemiTrainer, labeled: dict, unlabeled: dict) -> dict[str, torch.Tensor]:
    """(c): the supervised baseline's step on the same network and labeled batch."""
    return {"loss": trainer.loss(trainer.network(labeled["data"], labeled["prompt"]), labeled["target"])}


STEPS = {"ours": VerSemiTrainer.train_step, "public": public_step, "supervised": supervised_step}


def setup(args: argparse.Namespace) -> tuple[VerSemiTrainer, dict, dict]:
    """Network (train mode), trainer and the fixed batch."""
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 check on CUDA
    torch.manual_seed(0)
    model = build_network(NETWORK_PLANS[args.architecture], in_channels=1, num_prompts=args.prompts)
    trainer = make_trainer(model.to(device).train(), [args.patch] * 3, args.prompts)
    return trainer, *make_batches(args.batch, args.patch, args.prompts, device)


def run_step(mode: str, trainer: VerSemiTrainer, labeled: dict, unlabeled: dict, amp: bool = False) -> dict:
    """Zero the gradients, draw the boxes from STEP_SEED, compute the terms and back-propagate the loss."""
    trainer.network.zero_grad(set_to_none=True)
    torch.manual_seed(STEP_SEED)
    device = labeled["data"].device
    with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
        terms = STEPS[mode](trainer, labeled, unlabeled)
    terms["loss"].backward()
    return terms


def check_equivalence(trainer: VerSemiTrainer, labeled: dict, unlabeled: dict, precision: str) -> float:
    """Print each term of both modes, their differences and gradient differences; returns the worst."""
    params = list(trainer.network.named_parameters())
    checked = [params[i] for i in (0, len(params) // 2, -3, -1)]  # first conv, middle, prompt head
    results = {}
    for mode in ("ours", "public"):
        terms = run_step(mode, trainer, labeled, unlabeled)
        results[mode] = ({k: float(v.detach()) for k, v in terms.items()}, [p.grad.clone() for _, p in checked])
    (ours, grads_a), (public, grads_b) = results["ours"], results["public"]
    assert ours.keys() == public.keys(), (ours.keys(), public.keys())
    print(f"equivalence check ({precision}, same weights, batch and boxes):")
    worst = 0.0
    for name in ours:
        diff = abs(ours[name] - public[name])
        worst = max(worst, diff)
        print(f"  {name:>12}: ours {ours[name]:.7f}  public {public[name]:.7f}  |diff| {diff:.1e}")
    for (name, _), ga, gb in zip(checked, grads_a, grads_b):
        diff, scale = float((ga - gb).abs().max()), float(ga.abs().max())
        print(f"  grad {name} {tuple(ga.shape)}: max |diff| {diff:.1e} = {diff / scale:.1e} of max |grad|")
    print(f"  -> losses agree within 1e-5: {'YES' if worst <= 1e-5 else 'NO'} (max |diff| {worst:.1e})")
    return worst


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(mode: str, trainer: VerSemiTrainer, labeled: dict, unlabeled: dict, amp: bool) -> tuple[float, float]:
    """Wall-clock and CPU seconds (all threads of this process) of one forward + backward."""
    device = labeled["data"].device
    synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    run_step(mode, trainer, labeled, unlabeled, amp)
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def measure_times(args: argparse.Namespace, trainer: VerSemiTrainer, labeled: dict, unlabeled: dict) -> dict:
    """(wall, CPU) times of both modes, alternating a/b, after ``--warmup`` unrecorded rounds."""
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for i in range(args.warmup + args.repeats):
        for mode in MODES:
            seconds = timed_step(mode, trainer, labeled, unlabeled, args.amp)
            if i >= args.warmup:
                times[mode].append(seconds)
    return times


def peak_rss_mib() -> float:
    """Peak RSS of this process: VmHWM (ru_maxrss of a fork + exec child starts at its parent's peak)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory(mode: str, args: argparse.Namespace) -> dict[str, float]:
    """Peak memory of two steps of one mode, alone in this (fresh) process."""
    trainer, labeled, unlabeled = setup(args)
    device = labeled["data"].device
    figures = {"rss_before_mib": peak_rss_mib()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        timed_step(mode, trainer, labeled, unlabeled, args.amp)
    figures["max_rss_mib"] = peak_rss_mib()
    if device.type == "cuda":
        figures["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return figures


def memory_in_subprocess(mode: str, argv: list[str]) -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, *argv, "--mode", mode], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace, times: dict, memory: dict) -> None:
    """A table of both modes and the public/ours ratios (CPU time shows whether other load interfered:
    on an otherwise idle CPU it is about threads x wall)."""
    print(f"\n{args.architecture}, patch {args.patch}^3, labeled batch {args.batch} + unlabeled {args.batch}, "
          f"K={args.prompts} prompts, device {args.device}{' (AMP)' if args.amp else ''}, "
          f"{torch.get_num_threads()} torch threads; {args.repeats} alternating steps after {args.warmup} warm-up")
    cuda = "cuda_peak_mib" in memory["ours"]
    print(f"  {'mode':<27} {'median s':>8} {'min s':>6} {'CPU s':>6}  {'runs (wall s / CPU s)':<28} "
          f"{'CUDA peak MiB' if cuda else 'peak RSS MiB (growth)'}")
    labels = {"ours": "(a) ours: 1 backbone pass", "public": f"(b) public: {args.prompts + 4} full passes",
              "supervised": "(c) supervised step"}
    wall, cpu, memory_used = {}, {}, {}
    for mode in MODES:
        m = memory[mode]
        wall[mode], cpu[mode] = [w for w, _ in times[mode]], [c for _, c in times[mode]]
        memory_used[mode] = m["cuda_peak_mib"] if cuda else m["max_rss_mib"] - m["rss_before_mib"]
        mem = f"{memory_used[mode]:.0f}" if cuda else f"{m['max_rss_mib']:.0f} (+{memory_used[mode]:.0f})"
        runs = ", ".join(f"{w:.1f}/{c:.1f}" for w, c in times[mode])
        print(f"  {labels[mode]:<27} {statistics.median(wall[mode]):>8.2f} {min(wall[mode]):>6.2f} "
              f"{statistics.median(cpu[mode]):>6.1f}  {runs:<28} {mem}")
    ratio = lambda f, t, x="public", y="ours": f(t[x]) / f(t[y])  # noqa: E731
    print(f"  time ratio (b)/(a): median wall {ratio(statistics.median, wall):.2f}x, min wall {ratio(min, wall):.2f}x, "
          f"median CPU time {ratio(statistics.median, cpu):.2f}x  (target >= 2.2x)")
    images = 2 * args.batch + args.batch // 2  # labeled, CutMix of its halves, pastes into unlabeled
    print(f"  time ratio (a)/(c), VerSemi stage 2 / supervised: median wall "
          f"{ratio(statistics.median, wall, 'ours', 'supervised'):.2f}x, min wall {ratio(min, wall, 'ours', 'supervised'):.2f}x "
          f"(images through the backbone {images} / {args.batch} = {images / args.batch:.2f}x; target <= 2.5x)")
    print(f"  memory ratio (b)/(a) ({'CUDA peak' if cuda else 'RSS growth during steps'}): "
          f"{memory_used['public'] / memory_used['ours']:.2f}x")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", choices=sorted(NETWORK_PLANS), default="unet")
    parser.add_argument("--patch", type=int, default=64, help="cubic patch side (multiple of 16)")
    parser.add_argument("--batch", type=int, default=2, help="labeled batch (the unlabeled batch is the same)")
    parser.add_argument("--prompts", type=int, default=3, help="K = real tasks + 1 synthetic")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="autocast the timed steps (CUDA only)")
    parser.add_argument("--check-float64", action="store_true",
                        help="repeat the check in float64 (fp32 gradient differences are rounding, not logic); "
                             "needs ~20 GB RAM at 64^3, use --patch 32 on small machines")
    parser.add_argument("--mode", choices=MODES, help="internal: one mode's peak memory as JSON")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.mode:
        print(json.dumps(measure_memory(args.mode, args)))
        return
    memory = {mode: memory_in_subprocess(mode, argv) for mode in MODES}  # before this process grows
    trainer, labeled, unlabeled = setup(args)
    check_equivalence(trainer, labeled, unlabeled, "fp32")
    if args.check_float64:
        double = lambda d: {k: v.double() if v.is_floating_point() else v for k, v in d.items()}  # noqa: E731
        trainer64 = make_trainer(copy.deepcopy(trainer.network).double(), trainer.patch_size, args.prompts)
        check_equivalence(trainer64, double(labeled), double(unlabeled), "float64")
    report(args, measure_times(args, trainer, labeled, unlabeled), memory)


if __name__ == "__main__":
    main(sys.argv[1:])
