"""``--supervised-warm-up``: a semi-supervised trainer first trains supervised, then its method starts
with its stages and ramp-ups shifted; a schedule too short for both stays supervised (and is then
SupervisedTrainer's run, weight for weight); a warm start needs none; a time budget splits its seconds."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from versemi.cli import train_main
from versemi.errors import InputError
from versemi.model.config import TrainingConfig
from versemi.training import budget
from versemi.training.trainers import find_trainer
from versemi.training.warm_up import (
    MIN_METHOD_ITERATIONS,
    WARM_UP_ITERATIONS,
    parse_request,
    split_epochs,
    split_iterations,
)

from conftest import TOY_EXPERIMENT

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(patch_size=[16, 32, 32], batch_size=2, features=[4, 8, 16], num_workers=0, optimizer="adam", lr=3e-3,
             val_iterations=1)


def new_trainer(name: str, planned: Path, folder: Path, **config):
    """A trainer of the toy experiment, not yet set up (``run`` does that)."""
    plans = json.loads((planned / TOY_EXPERIMENT / "plans.json").read_text(encoding="utf-8"))
    return find_trainer(name)(plans, planned, "3d_fullres", "0", folder, TrainingConfig(**{**SMALL, **config}))


def test_requests_are_auto_or_a_share():
    assert parse_request("auto") == parse_request(" AUTO ") == "auto"
    assert parse_request("0.25") == "0.25" and parse_request("0") == "0" and parse_request("1.0") == "1"
    for bad in ("1.5", "-0.1", "half", "nan"):
        with pytest.raises(InputError, match="--supervised-warm-up"):
            parse_request(bad)


def test_auto_warms_up_only_where_the_method_keeps_enough_iterations():
    enough = WARM_UP_ITERATIONS + MIN_METHOD_ITERATIONS
    assert split_iterations("auto", enough, warm_started=False) == WARM_UP_ITERATIONS
    assert split_iterations("auto", enough - 1, warm_started=False) == enough - 1  # supervised throughout
    # a longer schedule warms up for half of it
    assert split_iterations("auto", 3 * enough + 1, warm_started=False) == math.ceil((3 * enough + 1) / 2)
    assert split_iterations("auto", enough, warm_started=True) == 0
    assert split_iterations("0.25", 400, warm_started=True) == 100 and split_iterations("0", 400, False) == 0


def test_a_time_budget_is_split_in_epochs_that_fit():
    # 100 iterations per epoch; a supervised epoch costs 10 s, a method epoch 20 s
    # auto: half the seconds supervised (500 s, 50 epochs), the method in the rest (25 epochs)
    warm, method = split_epochs("auto", 1000.0, 100, 10.0, 20.0, warm_started=False)
    assert (warm, method) == (50, 25) and warm * 10 + method * 20 <= 1000
    # 400 s: 20 epochs supervised, 10 = 1000 iterations of the method
    assert split_epochs("auto", 400.0, 100, 10.0, 20.0, warm_started=False) == (20, 10)
    # 250 s: the method would get 10 epochs = 1000 iterations after the warm-up only with 300 s
    assert split_epochs("auto", 250.0, 100, 10.0, 20.0, warm_started=False) == (25, 0)
    assert split_epochs("auto", 1000.0, 100, 10.0, 20.0, warm_started=True) == (0, 50)
    assert split_epochs("0.5", 1000.0, 100, 10.0, 20.0, warm_started=False) == (50, 25)


def test_a_short_schedule_trains_exactly_as_supervised_trainer(planned, tmp_path, monkeypatch):
    """auto, 6 iterations: MeanTeacher never starts its method, never loads an unlabeled batch, and
    ends with SupervisedTrainer's weights."""
    from versemi.training import trainer as loop

    loaded = []
    real_loader = loop.batch_loader
    monkeypatch.setattr(loop, "batch_loader", lambda source, *a: loaded.append(source.stream) or real_loader(source, *a))
    runs = {}
    for name in ("SupervisedTrainer", "MeanTeacherTrainer"):
        runs[name] = new_trainer(name, planned, tmp_path / name, epochs=3, iterations_per_epoch=2)
        runs[name].run()
    mean_teacher = runs["MeanTeacherTrainer"]
    assert mean_teacher.config.warm_up_epochs == 3 and mean_teacher.stage == 1
    assert "unlabeled" not in loaded and "labeled" in loaded
    for (key, theirs), mine in zip(runs["SupervisedTrainer"].model.state_dict().items(),
                                   mean_teacher.model.state_dict().values()):
        assert torch.equal(theirs, mine), key
    log = (tmp_path / "MeanTeacherTrainer" / "training_log.txt").read_text(encoding="utf-8")
    assert "the whole schedule (6 iterations) trains supervised" in log
    saved = torch.load(tmp_path / "MeanTeacherTrainer" / "checkpoint_final.pth", weights_only=False)["config"]
    assert saved["supervised_warm_up"] == "auto" and saved["warm_up_epochs"] == 3


# every trainer that trains the 3d configuration with unlabeled scans (ERSR and SelfPacedContrastive
# train 2d only; MeanTeacher and MutualLearning are checked in detail above)
SEMI_SUPERVISED_3D = ("VerSemiTrainer", "SelfTrainingTrainer", "TransMedSegTrainer", "BCPTrainer", "CADTrainer",
                      "M3HLTrainer", "MEDLTrainer", "C3S3Trainer", "MNTrainer")


@pytest.mark.parametrize("name", SEMI_SUPERVISED_3D)
def test_every_trainer_whose_method_never_starts_ends_with_supervised_trainers_weights(planned, tmp_path, name):
    """Why a short budget cannot lose against SupervisedTrainer: with the method never started, a
    semi-supervised run is SupervisedTrainer's run weight for weight."""
    reference = new_trainer("SupervisedTrainer", planned, tmp_path / "reference", epochs=3, iterations_per_epoch=2)
    reference.run()
    trainer = new_trainer(name, planned, tmp_path / name, epochs=3, iterations_per_epoch=2)
    trainer.run()
    assert trainer.supervised_throughout
    for (key, theirs), mine in zip(reference.model.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.equal(theirs, mine), f"{name}: {key} differs from SupervisedTrainer's"


def test_a_two_network_trainer_that_stays_supervised_trains_and_keeps_its_main_network_only(planned, tmp_path):
    """auto, 6 iterations: MutualLearning's peer never trains (its optimizer never steps), the main
    network ends with SupervisedTrainer's weights, and the checkpoint predicts with it alone."""
    from versemi.inference import load_models
    from versemi.model.checkpoint import member_names

    runs = {}
    for name in ("SupervisedTrainer", "MutualLearningTrainer"):
        runs[name] = new_trainer(name, planned, tmp_path / name, epochs=3, iterations_per_epoch=2)
        runs[name].run()
    mutual = runs["MutualLearningTrainer"]
    assert mutual.supervised_throughout and list(mutual.members()) == [mutual.network_name]
    (peer,) = mutual.extra_networks.values()
    assert peer.network_plan is not None and not peer.optimizer.state  # a member of the method, never stepped
    for (key, theirs), mine in zip(runs["SupervisedTrainer"].model.state_dict().items(),
                                   mutual.model.state_dict().values()):
        assert torch.equal(theirs, mine), key
    checkpoint = tmp_path / "MutualLearningTrainer" / "checkpoint_final.pth"
    state = torch.load(checkpoint, weights_only=False)
    assert member_names(state) == [mutual.network_name] and len(load_models(checkpoint).models) == 1
    log = (tmp_path / "MutualLearningTrainer" / "training_log.txt").read_text(encoding="utf-8")
    assert "only the main network trains and predicts" in log


def test_a_budget_that_stays_supervised_is_priced_at_the_main_network_alone():
    # a warm-up epoch of both networks costs 20 s, of the main one alone 10 s, a method epoch 30 s
    assert split_epochs("auto", 400.0, 100, 20.0, 30.0, warm_started=False, alone_epoch=10.0) == (40, 0)
    assert split_epochs("1", 500.0, 100, 20.0, 30.0, warm_started=False, alone_epoch=10.0) == (50, 0)
    assert split_epochs("0.5", 1000.0, 100, 20.0, 30.0, warm_started=False, alone_epoch=10.0) == (25, 16)


def test_the_method_starts_after_the_warm_up_with_its_teacher_copied(planned, tmp_path):
    trainer = new_trainer("MeanTeacherTrainer", planned, tmp_path / "run", epochs=4, iterations_per_epoch=2,
                          supervised_warm_up="0.5")
    steps, unlabeled_seen, at_method_start = [], [], []
    real_optimize, real_end = trainer.optimize, trainer.on_warm_up_end
    trainer.train_step = lambda labeled, unlabeled: steps.append(trainer.epoch) or type(trainer).train_step(
        trainer, labeled, unlabeled)
    trainer.optimize = lambda i, labeled, unlabeled: unlabeled_seen.append(unlabeled is not None) or real_optimize(
        i, labeled, unlabeled)

    def end():
        real_end()
        teacher = trainer.teachers["teacher"].network.state_dict()
        at_method_start.append(all(torch.equal(v, teacher[k]) for k, v in trainer.model.state_dict().items()))

    trainer.on_warm_up_end = end
    trainer.run()
    assert trainer.config.warm_up_epochs == 2
    assert steps == [2, 2, 3, 3]                      # the method's step only after 2 supervised epochs
    assert unlabeled_seen == [False] * 4 + [True] * 4  # no unlabeled batch during the warm-up
    assert at_method_start == [True]
    log = (tmp_path / "run" / "training_log.txt").read_text(encoding="utf-8")
    assert "supervised warm-up: epochs 1-2 (4 iterations) supervised, then the method for 4 iterations" in log


def test_stages_and_unlabeled_data_count_from_the_methods_start(planned, tmp_path):
    trainer = new_trainer("VerSemiTrainer", planned, tmp_path / "run", epochs=10, iterations_per_epoch=3,
                          supervised_warm_up="0.4", method={"stage1_fraction": 0.5})
    trainer.setup()
    trainer.resolve_warm_up()
    assert trainer.warm_up_epochs == 4 and trainer.method_epochs == 6
    assert trainer.stage_starts() == [3] and trainer.method_stage_epochs() == [7]
    assert trainer.first_unlabeled_iteration() == 7 * 3
    stages = []
    for epoch in range(10):
        trainer.epoch = epoch
        stages.append((trainer.in_warm_up, trainer.method_epoch, trainer.stage))
    assert stages[3] == (True, 0, 1) and stages[4] == (False, 0, 1) and stages[7] == (False, 3, 2)


def test_a_warm_start_and_supervised_trainer_get_no_warm_up(planned, tmp_path):
    trainer = new_trainer("MeanTeacherTrainer", planned, tmp_path / "mt", epochs=1000, iterations_per_epoch=250)
    trainer.warm_start = {"checkpoint": "elsewhere"}
    trainer.resolve_warm_up()
    assert trainer.warm_up_epochs == 0
    fresh = new_trainer("MeanTeacherTrainer", planned, tmp_path / "fresh", epochs=1000, iterations_per_epoch=250)
    fresh.resolve_warm_up()
    assert fresh.warm_up_epochs == 500  # half the schedule
    supervised = new_trainer("SupervisedTrainer", planned, tmp_path / "sup", supervised_warm_up="0.5")
    supervised.resolve_warm_up()
    assert supervised.warm_up_epochs == 0 and not supervised.in_warm_up


def test_the_time_budget_times_the_warm_up_step_and_splits_the_seconds(planned, tmp_path, monkeypatch):
    trainer = new_trainer("MeanTeacherTrainer", planned, tmp_path / "run", time_budget=1.0)
    trainer.setup()
    monkeypatch.setattr(budget, "time_phase", lambda t, epoch: 0.01)
    monkeypatch.setattr(budget, "time_warm_up_step", lambda t, alone=False: 0.004)
    monkeypatch.setattr(budget, "time_epoch_overhead", lambda t: 0.0)
    trainer.started = time.time()
    record = budget.fit_schedule(trainer)
    warm, per_epoch = trainer.config.warm_up_epochs, trainer.config.iterations_per_epoch
    method = trainer.config.epochs - warm
    assert record["supervised_warm_up_epochs"] == warm and record["supervised_warm_up_seconds_per_iteration"] == 0.004
    # auto: half the budget's seconds at the supervised step, the method in the rest
    assert WARM_UP_ITERATIONS <= warm * per_epoch
    assert warm * per_epoch * 0.004 <= 30 * budget.SAFETY < (warm + 1) * per_epoch * 0.004 + 0.5
    assert method * per_epoch >= MIN_METHOD_ITERATIONS
    assert warm * per_epoch * 0.004 + method * per_epoch * 0.01 <= 60 * budget.SAFETY
    assert "the first" in record["message"] and "epochs supervised" in record["message"]


def test_the_flag_is_checked_and_kept_on_continue(planned, tmp_path, monkeypatch):
    monkeypatch.setenv("VERSEMI_RESULTS", str(tmp_path / "results"))
    tiny = ["3d_fullres", "0", "--plans-root", str(planned), "-tr", "MeanTeacherTrainer", "--patch-size", "16", "32",
            "32", "--batch-size", "2", "--features", "4", "8", "16", "--num-workers", "0", "--val-iterations", "1",
            "--epochs", "2", "--iterations-per-epoch", "1"]
    assert train_main([*tiny, "--supervised-warm-up", "lots"]) == 2
    assert train_main([*tiny, "--supervised-warm-up", "0.5"]) == 0
    assert train_main([*tiny, "--continue", "--supervised-warm-up", "0"]) == 2
    assert train_main([*tiny, "--continue", "--supervised-warm-up", "0.5"]) == 0


def test_runs_saved_before_the_setting_continue_without_a_warm_up():
    old = {k: v for k, v in TrainingConfig().to_dict().items() if k not in ("supervised_warm_up", "warm_up_epochs")}
    config = TrainingConfig.from_dict(old)
    assert config.supervised_warm_up == "0" and config.warm_up_epochs == 0
    assert TrainingConfig.from_dict(TrainingConfig().to_dict()).supervised_warm_up == "auto"
