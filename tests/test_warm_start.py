"""``versemi_train --init-from``: a new run starts from another run's weights (any trainer of the
same network plan, prompts and channels), its teachers and matching members too, without the
pre-training stage; refused with the mismatch named otherwise; recorded, and not redone on --continue."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch

from versemi.cli import train_main
from versemi.errors import InputError

from conftest import TINY_TRAINING, TOY_EXPERIMENT, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def saved_checkpoint(name: str, planned: Path, folder: Path, **config) -> Path:
    """The checkpoint of a set-up (untrained) ``name`` trainer whose weights differ from the default
    initialisation (another seed)."""
    trainer = make_trainer(name, planned, folder, seed=7, **config)
    trainer.save("final")
    return trainer.checkpoint_path("final")


@pytest.fixture(scope="module")
def supervised_source(planned, tmp_path_factory) -> Path:
    return saved_checkpoint("SupervisedTrainer", planned, tmp_path_factory.mktemp("source"))


def assert_weights(module: torch.nn.Module, weights: dict) -> None:
    mine = module.state_dict()
    assert mine.keys() == weights.keys()
    for key in mine:
        assert torch.equal(mine[key].cpu(), weights[key].cpu()), key


def source_weights(path: Path, member: str | None = None) -> dict:
    state = torch.load(path, weights_only=False)
    return state["network"] if member is None else state["networks"][member]["network"]


@pytest.mark.parametrize("name", ["VerSemiTrainer", "BCPTrainer", "MeanTeacherTrainer", "SelfTrainingTrainer"])
def test_main_network_and_teacher_start_from_the_checkpoint(planned, tmp_path, supervised_source, name):
    fresh = make_trainer(name, planned, tmp_path / "fresh")  # initialised otherwise: the test can fail
    assert any(not torch.equal(mine, theirs) for mine, theirs in
               zip(fresh.model.state_dict().values(), source_weights(supervised_source).values()))
    trainer = make_trainer(name, planned, tmp_path, init_from=str(supervised_source))
    assert_weights(trainer.model, source_weights(supervised_source))
    for teacher in trainer.teachers.values():
        assert_weights(teacher.network, source_weights(supervised_source))
    assert trainer.warm_start["trainer"] == "SupervisedTrainer" and trainer.warm_start["fold"] == "0"
    assert trainer.warm_start["sha256"] == hashlib.sha256(supervised_source.read_bytes()).hexdigest()
    # the optimizer is new: no moments carried over
    assert not trainer.optimizer.state_dict()["state"]


@pytest.mark.parametrize("name,setting", [("VerSemiTrainer", "stage1_fraction"), ("BCPTrainer", "pretrain_fraction"),
                                          ("M3HLTrainer", "pretrain_fraction")])
def test_the_pre_training_stage_is_skipped(planned, tmp_path, supervised_source, name, setting):
    assert make_trainer(name, planned, tmp_path / "fresh").stage == 1
    trainer = make_trainer(name, planned, tmp_path, init_from=str(supervised_source))
    assert trainer.epoch == 0 and trainer.stage == 2 and trainer.stage_starts() == [0]
    assert trainer.unlabeled_from() == 0
    assert trainer.settings[setting] == 0 and trainer.config.method[setting] == 0  # kept on --continue
    assert trainer.warm_start["skipped_stage"] == setting


def test_a_checkpoint_of_any_trainer_serves(planned, tmp_path):
    source = saved_checkpoint("MeanTeacherTrainer", planned, tmp_path / "source")
    trainer = make_trainer("SupervisedTrainer", planned, tmp_path, init_from=str(source))
    assert_weights(trainer.model, source_weights(source))
    assert trainer.warm_start["trainer"] == "MeanTeacherTrainer"


def test_a_member_of_the_same_name_and_plan_is_loaded_the_others_are_logged(planned, tmp_path, supervised_source):
    medl = saved_checkpoint("MEDLTrainer", planned, tmp_path / "medl")
    c3s3 = make_trainer("C3S3Trainer", planned, tmp_path / "c3s3", init_from=str(medl))
    assert_weights(c3s3.model, source_weights(medl))
    assert_weights(c3s3.extra_networks["vnet"].model, source_weights(medl, "vnet"))
    assert c3s3.warm_start["loaded"] == ["unet", "vnet"] and c3s3.warm_start["left_as_initialised"] == []

    from_supervised = make_trainer("MEDLTrainer", planned, tmp_path / "medl2", init_from=str(supervised_source))
    assert_weights(from_supervised.model, source_weights(supervised_source))
    assert from_supervised.warm_start["left_as_initialised"] == ["vnet"]
    log = (tmp_path / "medl2" / "MEDLTrainer" / "training_log.txt").read_text(encoding="utf-8")
    assert "network 'vnet' left as initialised" in log


def test_mutual_learning_skips_stage_1_only_with_both_networks(planned, tmp_path, supervised_source):
    partial = make_trainer("MutualLearningTrainer", planned, tmp_path / "partial", init_from=str(supervised_source))
    assert partial.stage == 1 and partial.settings["stage1_fraction"] == 0.3  # stage 1 trains the peer
    assert partial.warm_start["left_as_initialised"] == ["peer"] and partial.warm_start["skipped_stage"] is None
    assert "stage 1 kept" in (tmp_path / "partial" / "MutualLearningTrainer" / "training_log.txt").read_text(encoding="utf-8")

    pair = saved_checkpoint("MutualLearningTrainer", planned, tmp_path / "pair")
    trainer = make_trainer("MutualLearningTrainer", planned, tmp_path, init_from=str(pair))
    assert trainer.stage == 2
    assert_weights(trainer.extra_networks["peer"].model, source_weights(pair, "peer"))
    assert_weights(trainer.teachers["stage1_main"].network, source_weights(pair))  # the frozen pair: the loaded one
    assert_weights(trainer.teachers["stage1_peer"].network, source_weights(pair, "peer"))


def fewer_prompts(plans: dict) -> dict:
    """The plans without the pancreas prompt (the synthetic one renumbered)."""
    plans = copy.deepcopy(plans)
    kept = [p for p in plans["prompts"] if p["dataset"] != "DemoPancreas"]
    plans["prompts"] = [{**p, "index": i} for i, p in enumerate(kept)]
    plans["num_prompts"], plans["synthetic_prompt"] = len(kept), len(kept) - 1
    return plans


def other_dataset(plans: dict) -> dict:
    plans = copy.deepcopy(plans)
    plans["prompts"][0]["dataset"] = "OtherLA"
    return plans


def two_channels(plans: dict) -> dict:
    return {**plans, "in_channels": 2}


@pytest.mark.parametrize("change,named", [(fewer_prompts, "prompts DemoLA/left_atrium, DemoPancreas/pancreas"),
                                          (other_dataset, "OtherLA/left_atrium"),
                                          (two_channels, "input channels 1 in the checkpoint, 2 in this run")])
def test_other_prompts_or_channels_are_refused(planned, tmp_path, supervised_source, change, named):
    plans = change(json.loads((planned / TOY_EXPERIMENT / "plans.json").read_text(encoding="utf-8")))
    with pytest.raises(InputError) as refused:
        make_trainer("SupervisedTrainer", planned, tmp_path, plans=plans, init_from=str(supervised_source))
    [problem] = refused.value.problems
    assert problem.file == str(supervised_source) and named in problem.problem
    assert "network" not in problem.problem  # only what differs is named


def test_other_features_or_a_missing_file_are_refused(planned, tmp_path, supervised_source):
    with pytest.raises(InputError) as refused:
        make_trainer("VerSemiTrainer", planned, tmp_path, features=[8, 16, 32], init_from=str(supervised_source))
    [problem] = refused.value.problems
    assert "network features [4, 8, 16, 16] in the checkpoint, [8, 16, 32, 32] in this run" in problem.problem
    missing = tmp_path / "nothing.pth"
    with pytest.raises(InputError, match="checkpoint does not exist") as refused:
        make_trainer("VerSemiTrainer", planned, tmp_path / "b", init_from=str(missing))
    assert refused.value.problems[0].file == str(missing)


@pytest.mark.slow
def test_cli_warm_start_is_recorded_and_not_redone_on_continue(planned, results, tmp_path, capsys):
    common = ["3d_fullres", "all", "--plans-root", str(planned), *TINY_TRAINING]
    assert train_main([*common, "-tr", "SupervisedTrainer"]) == 0
    source = tmp_path / "supervised.pth"
    (results / TOY_EXPERIMENT / "SupervisedTrainer__3d_fullres" / "fold_all" / "checkpoint_final.pth").rename(source)
    capsys.readouterr()
    assert train_main([*common, "--features", "8", "--init-from", str(source)]) == 2
    assert "network features [4, 8, 16, 16] in the checkpoint, [8, 8, 8, 8] in this run" in capsys.readouterr().err

    # two epochs: without a warm start, the first would be stage 1 (stage1_fraction 0.3 of 2 epochs)
    assert train_main([*common, "--epochs", "2", "--init-from", str(source)]) == 0
    folder = results / TOY_EXPERIMENT / "VerSemiTrainer__3d_fullres" / "fold_all"
    state = torch.load(folder / "checkpoint_final.pth", weights_only=False)
    assert state["config"]["init_from"] == str(source.resolve())
    assert state["warm_start"]["trainer"] == "SupervisedTrainer"
    assert state["warm_start"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert "consistency" in state["history"]["terms"][0]  # the first epoch ran stage 2
    log = (folder / "training_log.txt").read_text(encoding="utf-8")
    assert f"warm start from {source.resolve()} (SupervisedTrainer, fold all)" in log

    source.unlink()  # --continue loads the run's own checkpoint, never the source again
    assert train_main([*common, "--epochs", "3", "--continue"]) == 0
    state = torch.load(folder / "checkpoint_final.pth", weights_only=False)
    assert state["epoch"] == 3 and state["warm_start"]["trainer"] == "SupervisedTrainer"
    assert state["config"]["method"]["stage1_fraction"] == 0
    log = (folder / "training_log.txt").read_text(encoding="utf-8")
    assert log.count("warm start from") == 1 and "resumed at epoch 2" in log
