"""``--time-budget``: fit the whole schedule (LR decay, stages, ramp-ups) into a wall-clock budget.

After setup, a short warm-up times real training steps of each phase whose cost differs (e.g.
VerSemi's stage 1 and stage 2, and the supervised steps of the shared warm-up before a method
starts, ``warm_up``), with the real data loaders, then puts the network, optimizer and method
state back as they were. The supervised warm-up and the method then share the seconds as
``--supervised-warm-up`` asks (``warm_up.split_epochs``). From the seconds per iteration and the per-epoch overhead
(checkpoint, curves, validation) it fixes epochs x iterations per epoch, so the schedule ends
within the budget on the hardware at hand. The choice is stored in the training settings (and so
in every checkpoint): ``--continue`` keeps it exactly.

The up-front timing sees a few steps. Load from another process during those seconds, or a slow
start, can misjudge a step by 40 %, and the run then ends after 28 of its 40 minutes, or after 56.
So the schedule is checked once against the clock after the first ``CLOCK_CHECK_EPOCH`` epochs
(``check_against_clock``): where they took more than ``CLOCK_TOLERANCE`` more or less than timed,
the method's epochs are refitted to the time left. The warm-up keeps its epochs, a stage that has
started keeps its start, and the check is recorded in the settings like the rest of the schedule.
"""
from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from ..errors import input_error
from ..model.checkpoint import save_checkpoint
from .progress import TrainingLog
from .warm_up import split_epochs

WARMUP_STEPS = 2          # untimed: worker start, first allocations
TIMED_STEPS = 4           # per phase; the median is used
SAFETY = 0.97             # share of the remaining budget planned for
TARGET_EPOCHS = 50        # enough epochs for a smooth LR decay and stage switch in short budgets
MIN_ITERATIONS_PER_EPOCH = 10
CLOCK_CHECK_EPOCH = 2     # the schedule is checked against the clock once, after this many epochs ...
CLOCK_TOLERANCE = 0.10    # ... and refitted where they took more than this share more or less than timed


def time_phase(trainer, epoch: int) -> float:
    """Median seconds per iteration (step plus any wait for data) of real steps at ``epoch``."""
    trainer.epoch = epoch
    start = epoch * trainer.config.iterations_per_epoch
    steps = WARMUP_STEPS + TIMED_STEPS
    trainer.train_mode(True)
    marks, last = [], time.perf_counter()
    for offset, (labeled, unlabeled) in enumerate(trainer.batch_stream(start, start + steps)):
        trainer.optimize(start + offset, labeled, unlabeled)
        now = time.perf_counter()
        marks.append(now - last)
        last = now
    return statistics.median(marks[WARMUP_STEPS:])


def time_warm_up_step(trainer, alone: bool = False) -> float:
    """Median seconds per iteration of the shared supervised warm-up's steps (``alone``: those of
    a schedule that stays supervised throughout, where only the main network trains)."""
    epochs = trainer.config.epochs
    trainer.config.epochs = max(2, epochs or 2)
    trainer.config.warm_up_epochs = trainer.config.epochs if alone else 1
    try:
        return time_phase(trainer, 0)
    finally:
        trainer.config.epochs, trainer.config.warm_up_epochs = epochs, 0


def time_epoch_overhead(trainer) -> float:
    """Seconds an epoch spends outside its iterations: checkpoint, curves and patch validation."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=trainer.output_folder) as scratch:
        save_checkpoint(Path(scratch) / "probe.pth", trainer.checkpoint_contents())
        log = TrainingLog(Path(scratch))
        log.record(epoch=1, train_loss=1.0, val_loss=1.0, lr=1e-3, dice={"x": 0.5}, ema_dice=0.5, epoch_seconds=1.0,
                   iteration_losses=[1.0], terms={"loss": 1.0})
        log.plot()
    if trainer.val_source is not None:
        trainer.validate_epoch()
    return time.perf_counter() - started


def _agree(values: list[float]) -> list[float]:
    """The largest value of each entry over all DDP processes, so every process picks the same schedule."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64,
                          device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def fit_schedule(trainer) -> dict:
    """Time the phases, set ``config.epochs``, ``config.iterations_per_epoch`` and
    ``config.warm_up_epochs``; returns the record."""
    config = trainer.config
    request = config.supervised_warm_up if trainer.uses_unlabeled else "0"
    state = trainer.snapshot()
    config.warm_up_epochs = 0  # the method's phases first, then (if asked for) the warm-up's step
    phases = trainer.budget_phases()
    phase_seconds = [time_phase(trainer, epoch) for epoch, _ in phases]
    warm_up_step = time_warm_up_step(trainer) if request != "0" else None
    several = any(e.network_plan is not None for e in trainer.extra_networks.values())
    alone_step = time_warm_up_step(trainer, alone=True) if request != "0" and several else warm_up_step
    trainer.restore(state)
    overhead = time_epoch_overhead(trainer)
    per_iteration = sum(share * seconds for (_, share), seconds in zip(phases, phase_seconds))
    elapsed = time.time() - trainer.started
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    per_iteration, supervised, alone, overhead, elapsed = _agree([per_iteration, warm_up_step or per_iteration,
                                                                  alone_step or per_iteration, overhead, elapsed])
    available = config.time_budget * 60 * SAFETY - elapsed
    wanted = available / per_iteration
    per_epoch = min(config.iterations_per_epoch, max(MIN_ITERATIONS_PER_EPOCH, math.ceil(wanted / TARGET_EPOCHS)))
    warm_epochs, method_epochs = split_epochs(request, available, per_epoch, per_epoch * supervised + overhead,
                                              per_epoch * per_iteration + overhead, trainer.warm_start is not None,
                                              per_epoch * alone + overhead)
    epochs = warm_epochs + method_epochs
    if epochs < 1:
        raise input_error(f"--time-budget {config.time_budget:g}",
                          f"the budget does not cover one epoch of {per_epoch} iterations after the warm-up "
                          f"({elapsed:.0f} s so far, {per_iteration:.2f} s per iteration)",
                          "raise the budget, or train with --epochs instead")
    config.epochs, config.iterations_per_epoch, config.warm_up_epochs = epochs, per_epoch, warm_epochs
    phases_text = ", ".join(f"{s:.2f} s/it from method epoch {e}" for (e, _), s in zip(phases, phase_seconds))
    if warm_up_step is not None:
        phases_text = f"{supervised:.2f} s/it supervised, {phases_text}"
        if several:
            phases_text = f"{alone:.2f} s/it the main network alone, {phases_text}"
    message = (f"time budget {config.time_budget:g} min: warm-up {elapsed:.0f} s measured {phases_text} "
               f"(method mean {per_iteration:.2f} s/it, {overhead:.1f} s per epoch besides); training {epochs} epochs x "
               f"{per_epoch} iterations = {epochs * per_epoch} iterations"
               + (f", the first {warm_epochs} epochs supervised" if warm_epochs else "")
               # the timing sets the iterations: runs timed on a busier CPU get fewer, so say how busy
               + (f"; CPU load {load:.1f} on {os.cpu_count()} cores while timing" if load is not None else ""))
    return {"minutes": config.time_budget, "seconds_per_iteration": per_iteration, "phase_seconds": phase_seconds,
            "supervised_warm_up_seconds_per_iteration": warm_up_step and supervised,
            "supervised_warm_up_epochs": warm_epochs, "alone_seconds_per_iteration": alone,
            "epoch_overhead_seconds": overhead, "warmup_seconds": elapsed, "epochs": epochs,
            "iterations_per_epoch": per_epoch, "iterations": epochs * per_epoch, "load_while_timing": load,
            "message": message}


def planned_epoch_seconds(budget: dict, iterations_per_epoch: int, warm_up_epochs: int, epochs: int,
                          epoch: int, phase_starts: Sequence[int] = (0,)) -> float:
    """What the timing expected epoch ``epoch`` to cost (its steps and the per-epoch overhead): a
    warm-up epoch at the supervised step, a method epoch at the step of its phase, the phases
    starting at the method epochs ``phase_starts`` (the default, one phase, is the first phase's
    step: the one the clock check measures)."""
    if warm_up_epochs >= epochs:  # supervised throughout: the main network alone
        step = budget["alone_seconds_per_iteration"]
    elif epoch < warm_up_epochs:
        step = budget["supervised_warm_up_seconds_per_iteration"]
    else:
        phase = sum(1 for start in phase_starts[1:] if start <= epoch - warm_up_epochs)
        step = budget["phase_seconds"][phase]
    return iterations_per_epoch * step + budget["epoch_overhead_seconds"]


def seconds_left(trainer, last_epoch_seconds: float) -> float:
    """The ETA of the epochs left after the one just finished (``trainer.epoch`` counts it). A
    time-budgeted run knows what each phase's epoch costs (the supervised warm-up's epochs are
    cheaper than the method's, a later stage may cost more), so every epoch left counts at its
    planned cost, scaled by how the last epoch ran against its own plan; without those timings,
    every epoch left costs what the last one did."""
    config, budget = trainer.config, trainer.config.budget
    left = max(0, config.epochs - trainer.epoch)
    starts = [start for start, _ in trainer.budget_phases()]
    if not budget or "alone_seconds_per_iteration" not in budget or len(starts) != len(budget["phase_seconds"]) \
            or trainer.epoch < 1:
        return last_epoch_seconds * left

    def planned(epoch: int) -> float:
        return planned_epoch_seconds(budget, config.iterations_per_epoch, trainer.warm_up_epochs, config.epochs,
                                     epoch, starts)

    pace = last_epoch_seconds / planned(trainer.epoch - 1)
    return pace * sum(planned(epoch) for epoch in range(trainer.epoch, config.epochs))


def check_against_clock(trainer, timed_here: bool) -> bool:
    """After epoch ``CLOCK_CHECK_EPOCH`` of a time-budgeted run, refit the method's epochs to the time
    left where the epochs so far ran off the timing (module docstring). ``timed_here``: this process
    fitted the schedule (a resumed process's clock did not see the run's start, so it skips the
    check). Returns True when ``config.epochs`` changed; every step is logged."""
    config = trainer.config
    budget = config.budget
    if not budget or "clock_check" in budget or trainer.epoch != CLOCK_CHECK_EPOCH \
            or "alone_seconds_per_iteration" not in budget:  # schedules fitted before the check existed
        return False
    epochs, per_epoch, warm = config.epochs, config.iterations_per_epoch, trainer.warm_up_epochs
    if not timed_here:
        budget["clock_check"] = {"after_epochs": trainer.epoch, "skipped": "resumed before the check"}
        return False
    spent = time.time() - trainer.started - budget["warmup_seconds"]
    planned = sum(planned_epoch_seconds(budget, per_epoch, warm, epochs, e) for e in range(trainer.epoch))
    ratio, spent = _agree([spent / planned, spent])
    record = {"after_epochs": trainer.epoch, "ratio": round(ratio, 3), "epochs_before": epochs}
    budget["clock_check"] = record
    if abs(ratio - 1) <= CLOCK_TOLERANCE or epochs <= trainer.epoch:
        record["epochs"] = epochs
        _write(trainer, f"time budget: the first {trainer.epoch} epochs took {ratio:.2f}x the timing; "
                        f"the schedule stays at {epochs} epochs")
        return False
    left = config.time_budget * 60 * SAFETY - budget["warmup_seconds"] - spent
    overhead = budget["epoch_overhead_seconds"]
    if warm >= epochs:  # supervised throughout, and so it stays
        new_epochs = trainer.epoch + int(max(0.0, left) // (ratio * (per_epoch * budget["alone_seconds_per_iteration"]
                                                                     + overhead)))
    else:
        warm_left = max(0, warm - trainer.epoch) * ratio * planned_epoch_seconds(budget, per_epoch, warm, epochs, 0)
        method_epoch = ratio * (per_epoch * budget["seconds_per_iteration"] + overhead)
        new_epochs = max(warm + 1, max(warm, trainer.epoch) + int(max(0.0, left - warm_left) // method_epoch))
    new_epochs = max(trainer.epoch + 1, new_epochs)
    stages_before, warm_setting = trainer.method_stage_epochs(), config.warm_up_epochs
    config.epochs = new_epochs
    if warm >= epochs:
        config.warm_up_epochs = new_epochs
    moved = [(old, new) for old, new in zip(stages_before, trainer.method_stage_epochs())
             if old != new and min(old, new) < trainer.epoch]
    if moved:  # a stage that has started (or would now have) keeps the schedule it started under
        config.epochs, config.warm_up_epochs = epochs, warm_setting
        record["epochs"] = epochs
        _write(trainer, f"time budget: the first {trainer.epoch} epochs took {ratio:.2f}x the timing, but a "
                        f"refit would move a stage that has started (epoch {moved[0][0]} -> {moved[0][1]}); "
                        f"the schedule stays at {epochs} epochs")
        return False
    record["epochs"] = new_epochs
    budget["epochs"], budget["iterations"] = new_epochs, new_epochs * per_epoch
    _write(trainer, f"time budget: the first {trainer.epoch} epochs took {ratio:.2f}x the timing; the schedule "
                    f"now ends after {new_epochs} epochs ({new_epochs * per_epoch} iterations) instead of {epochs}")
    return True


def _write(trainer, line: str) -> None:
    if trainer.is_main:
        trainer.log.write(line)
        print(line, flush=True)
