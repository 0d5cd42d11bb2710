"""The training log's ETA: a time-budgeted run counts every epoch left at its phase's timed cost, so a
run still in its cheap supervised warm-up, or before a dearer stage, does not promise to end early."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from versemi.training.budget import seconds_left


def trainer_after(epoch: int, *, epochs=50, per_epoch=10, warm=0, phases=((0, 1.0),), phase_seconds=(1.0,),
                  warm_step=0.5, alone_step=0.4, overhead=2.0, budget=True):
    record = {"phase_seconds": list(phase_seconds), "seconds_per_iteration": phase_seconds[0],
              "supervised_warm_up_seconds_per_iteration": warm_step, "alone_seconds_per_iteration": alone_step,
              "epoch_overhead_seconds": overhead} if budget else None
    config = SimpleNamespace(budget=record, epochs=epochs, iterations_per_epoch=per_epoch, warm_up_epochs=warm)
    return SimpleNamespace(config=config, epoch=epoch, warm_up_epochs=warm, budget_phases=lambda: list(phases))


def test_warm_up_epochs_do_not_set_the_pace_of_the_method_epochs():
    # 20 supervised epochs of 10 x 0.5 s + 2 s, then 30 method epochs of 10 x 1.5 s + 2 s
    trainer = trainer_after(1, warm=20, phase_seconds=(1.5,))
    eta = seconds_left(trainer, last_epoch_seconds=7.0)  # the warm-up epoch ran as timed
    assert eta == pytest.approx(19 * 7.0 + 30 * 17.0)
    # an epoch that ran twice as slow as timed doubles every epoch left
    assert seconds_left(trainer, last_epoch_seconds=14.0) == pytest.approx(2 * (19 * 7.0 + 30 * 17.0))
    # the old rule, the last epoch times the epochs left, would have promised 49 x 7 s
    assert eta > 49 * 7.0 * 1.5


def test_each_stage_counts_at_its_own_step():
    # stage 2 starts at method epoch 10 and costs twice a stage-1 step
    trainer = trainer_after(5, epochs=40, phases=((0, 0.25), (10, 0.75)), phase_seconds=(1.0, 2.0))
    assert seconds_left(trainer, last_epoch_seconds=12.0) == pytest.approx(5 * 12.0 + 30 * 22.0)


def test_supervised_throughout_counts_the_main_network_alone():
    trainer = trainer_after(3, epochs=10, warm=10, phase_seconds=(3.0,))
    assert seconds_left(trainer, last_epoch_seconds=6.0) == pytest.approx(7 * 6.0)


@pytest.mark.parametrize("case", ["no budget", "phases changed", "before the first epoch"])
def test_without_matching_timings_every_epoch_left_costs_the_last_one(case):
    if case == "no budget":
        trainer = trainer_after(4, budget=False)
    elif case == "phases changed":
        trainer = trainer_after(4, phases=((0, 0.5), (25, 0.5)), phase_seconds=(1.0,))
    else:
        trainer = trainer_after(0)
    assert seconds_left(trainer, last_epoch_seconds=9.0) == pytest.approx(9.0 * (50 - trainer.epoch))
