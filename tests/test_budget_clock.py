"""The time budget's check against the clock: after the first epochs, a schedule whose timing
misjudged the step is refitted to the time left, once, without moving a stage that has started."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from versemi.training.budget import CLOCK_CHECK_EPOCH, SAFETY, check_against_clock

from conftest import TOY_EXPERIMENT


class FakeLog:
    def __init__(self):
        self.lines = []

    def write(self, line):
        self.lines.append(line)


def budgeted(ratio: float, *, minutes=10.0, epochs=50, per_epoch=10, step=1.0, overhead=2.0, warm=0, stages=(),
             warm_step=0.5, alone_step=0.4, supervised=True):
    """A trainer whose first CLOCK_CHECK_EPOCH epochs took ``ratio`` times what the timing planned."""
    budget = {"warmup_seconds": 5.0, "seconds_per_iteration": step, "phase_seconds": [step],
              "supervised_warm_up_seconds_per_iteration": warm_step, "alone_seconds_per_iteration": alone_step,
              "epoch_overhead_seconds": overhead, "epochs": epochs, "iterations": epochs * per_epoch}
    config = SimpleNamespace(budget=budget, epochs=epochs, iterations_per_epoch=per_epoch, warm_up_epochs=warm,
                             time_budget=minutes)
    trainer = SimpleNamespace(config=config, epoch=CLOCK_CHECK_EPOCH, log=FakeLog(), is_main=True,
                              warm_up_epochs=warm)
    trainer.method_stage_epochs = lambda: [trainer.config.warm_up_epochs + round(f * (trainer.config.epochs - warm))
                                           for f in stages]
    first = sum((per_epoch * (warm_step if e < warm else step) + overhead) for e in range(CLOCK_CHECK_EPOCH))
    trainer.started = time.time() - budget["warmup_seconds"] - ratio * first
    return trainer


def seconds_left(trainer) -> float:
    return trainer.config.time_budget * 60 * SAFETY - (time.time() - trainer.started)


@pytest.mark.parametrize("ratio", [0.7, 1.4])
def test_a_misjudged_timing_is_refitted_to_the_time_left(ratio):
    trainer = budgeted(ratio)
    assert check_against_clock(trainer, timed_here=True)
    epochs = trainer.config.epochs
    assert (epochs > 50) if ratio < 1 else (epochs < 50)
    # the epochs left, at their measured cost, fill the time left to within one epoch
    real_epoch = ratio * (10 * 1.0 + 2.0)
    left = seconds_left(trainer)
    assert (epochs - CLOCK_CHECK_EPOCH) * real_epoch <= left < (epochs - CLOCK_CHECK_EPOCH + 1) * real_epoch
    check = trainer.config.budget["clock_check"]
    assert check["epochs_before"] == 50 and check["epochs"] == epochs == trainer.config.budget["epochs"]
    assert trainer.config.budget["iterations"] == epochs * 10
    assert "instead of 50" in trainer.log.lines[-1]
    # once only
    trainer.epoch += 1
    assert not check_against_clock(trainer, timed_here=True) and trainer.config.epochs == epochs


def test_a_timing_within_the_tolerance_keeps_the_schedule():
    trainer = budgeted(1.05)
    assert not check_against_clock(trainer, timed_here=True)
    assert trainer.config.epochs == 50 and trainer.config.budget["clock_check"]["epochs"] == 50
    assert "stays at 50 epochs" in trainer.log.lines[-1]


def test_the_warm_up_keeps_its_epochs_and_the_method_gets_the_rest():
    trainer = budgeted(1.5, warm=10)
    assert check_against_clock(trainer, timed_here=True)
    assert trainer.config.warm_up_epochs == 10 and 10 < trainer.config.epochs < 50
    left = seconds_left(trainer) - 1.5 * (10 - CLOCK_CHECK_EPOCH) * (10 * 0.5 + 2.0)
    method = trainer.config.epochs - 10
    assert method * 1.5 * 12.0 <= left < (method + 1) * 1.5 * 12.0


def test_a_schedule_supervised_throughout_stays_so():
    trainer = budgeted(0.6, warm=50)
    assert check_against_clock(trainer, timed_here=True)
    assert trainer.config.warm_up_epochs == trainer.config.epochs > 50


def test_a_stage_that_has_started_keeps_its_schedule():
    # stage 2 started at epoch 1 of 50 (2 %); a refit to fewer epochs would move it to epoch 0
    trainer = budgeted(3.0, stages=(0.02,))
    assert trainer.method_stage_epochs() == [1]
    assert not check_against_clock(trainer, timed_here=True)
    assert trainer.config.epochs == 50 and "would move a stage" in trainer.log.lines[-1]


def test_a_process_that_resumed_before_the_check_skips_it():
    trainer = budgeted(2.0)
    assert not check_against_clock(trainer, timed_here=False)
    assert trainer.config.epochs == 50
    assert trainer.config.budget["clock_check"]["skipped"] == "resumed before the check"


def test_schedules_fitted_without_the_check_are_left_alone():
    trainer = budgeted(2.0)
    del trainer.config.budget["alone_seconds_per_iteration"]
    assert not check_against_clock(trainer, timed_here=True) and "clock_check" not in trainer.config.budget


@pytest.mark.slow
def test_a_run_timed_too_cheap_is_refitted_and_ends_at_its_new_epochs(planned, results, monkeypatch, capsys):
    # the timing reports a quarter of the real step: the schedule planned is about 4x too long, and the
    # first epochs show it; the refitted run must end at its new epoch count with the stream rebuilt
    from versemi.cli import train_main
    from versemi.training import budget as budget_module

    real = budget_module.time_phase
    monkeypatch.setattr(budget_module, "time_phase", lambda trainer, epoch: real(trainer, epoch) / 4)
    tiny = ["--patch-size", "16", "32", "32", "--batch-size", "2", "--features", "4", "8", "16", "--num-workers", "0",
            "--val-iterations", "1"]
    assert train_main(["3d_fullres", "0", "--plans-root", str(planned), *tiny, "-tr", "SupervisedTrainer",
                       "--time-budget", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "the schedule now ends after" in out
    folder = results / TOY_EXPERIMENT / "SupervisedTrainer__3d_fullres" / "fold_0"
    state = torch.load(folder / "checkpoint_final.pth", weights_only=False)
    check = state["config"]["budget"]["clock_check"]
    assert check["ratio"] > 1 + 0.1 and check["epochs"] < check["epochs_before"]
    assert state["epoch"] == state["config"]["epochs"] == check["epochs"] == state["config"]["budget"]["epochs"]
