"""The method's mathematics, pinned: losses, controller context, CutMix halves, stages and ramp-up,
deep supervision, method settings, logging of every term, the unlabeled stream, Mean Teacher's
prompts and exact resume, mixed precision and the time budget."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from versemi.cli import train_main
from versemi.errors import InputError
from versemi.nets.prompt_head import TaskController
from versemi.training import data as data_module
from versemi.training.budget import fit_schedule
from versemi.training.losses import SMOOTH, DiceCE, deep_supervision_weights
from versemi.training.method_settings import resolve_method_settings, unsaved
from versemi.model.precision import autocast_dtype, cpu_has_bf16
from versemi.training.run import parse_method
from versemi.training.trainers.versemi import DEFAULTS, PRESETS

from conftest import TOY_EXPERIMENT, assert_same_weights, fit_fixed_batch, make_trainer, train_killed_and_resumed

# a few iterations: without --supervised-warm-up 0 (auto) a method would train supervised throughout
TINY = ["--patch-size", "16", "32", "32", "--batch-size", "2", "--features", "4", "8", "16", "--num-workers", "0",
        "--val-iterations", "1", "--supervised-warm-up", "0"]
pytestmark = pytest.mark.usefixtures("one_thread")


def logits_from(prob: torch.Tensor) -> torch.Tensor:
    """2-class logits whose softmax target probability is ``prob`` (0/1 values) to within 1e-8."""
    return torch.stack([torch.zeros_like(prob), 40 * (prob - 0.5)], dim=-4)


# ----- losses -----
def test_supervised_dice_is_foreground_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 4, 6, 6)
    target = (torch.rand(2, 1, 4, 6, 6) > 0.7).float()
    p = torch.softmax(logits, 1)[:, 1:]
    dice = 1 - (2 * (p * target).sum() + SMOOTH) / (p.sum() + target.sum() + SMOOTH)
    ce = F.cross_entropy(logits, target[:, 0].long())
    assert float(DiceCE()(logits, target)) == pytest.approx(float(dice + ce), abs=1e-5)


def test_deep_supervision_weights_follow_nnunet():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])


# ----- network -----
def test_controller_context_keeps_per_image_feature_statistics():
    torch.manual_seed(0)
    controller = TaskController(context_channels=32, num_prompts=3)
    bottleneck = torch.randn(1, 32, 3, 4, 4)
    # the same spatial pattern, but each channel at another level: another image's statistics
    shifted = bottleneck * 2.0 + torch.linspace(-2, 2, 32).view(1, 32, 1, 1, 1)
    prompts = torch.tensor([[0, 1]])
    first = controller(controller.context(bottleneck), prompts)
    second = controller(controller.context(shifted), prompts)
    assert first.shape == (1, 2, 162)
    assert (first - second).abs().max() > 1e-2


def test_planned_networks_use_the_group_context_and_older_plans_rebuild_as_trained(planned):
    from versemi.nets import build_network

    plan = json.loads((planned / TOY_EXPERIMENT / "plans.json").read_text(encoding="utf-8"))["configurations"]["3d_fullres"]["network"]
    assert plan["context_norm"] == "group"
    assert isinstance(build_network(plan, 1, 3).prompt_head.controller.pre_pool[0], torch.nn.GroupNorm)
    older = {k: v for k, v in plan.items() if k != "context_norm"}
    assert isinstance(build_network(older, 1, 3).prompt_head.controller.pre_pool[0], torch.nn.InstanceNorm3d)


def test_planned_networks_use_the_leaky_head_and_older_plans_keep_the_relu(planned):
    from versemi.nets import build_network

    plan = json.loads((planned / TOY_EXPERIMENT / "plans.json").read_text(encoding="utf-8"))["configurations"]["3d_fullres"]["network"]
    assert plan["head_activation"] == "leaky_relu"
    assert build_network(plan, 1, 3).prompt_head.activation == "leaky_relu"
    older = {k: v for k, v in plan.items() if k != "head_activation"}
    assert build_network(older, 1, 3).prompt_head.activation == "relu"
    with pytest.raises(ValueError, match="unknown head activation 'gelu'"):
        build_network({**plan, "head_activation": "gelu"}, 1, 3)


# ----- VerSemi -----
def _labeled_batch(trainer, size: int) -> dict:
    """A labeled batch whose sample i is filled with the value i (the last samples are the loader's
    foreground-centred ones)."""
    batch = trainer.labeled_source[0]
    batch["data"] = torch.arange(size, dtype=torch.float32).view(-1, 1, 1, 1, 1).expand_as(batch["data"]).clone()
    return batch


def test_cutmix_halves_are_shuffled_so_foreground_patches_land_in_both_halves(planned, tmp_path):
    trainer = make_trainer("VerSemiTrainer", planned, tmp_path, batch_size=4)
    batch = _labeled_batch(trainer, 4)
    seen = []
    trainer.network = lambda x, prompts: seen.append(x) or torch.zeros(x.shape[0], prompts.shape[1], 2, *x.shape[2:])
    outside_values = set()
    for iteration in range(12):
        trainer.seed_iteration(iteration)
        try:
            trainer.train_step(batch, None)
        except Exception:  # the fake network's output has no graph; only its input matters here
            pass
        mixed = seen[-1][4:6]  # after the 4 plain images: the 2 CutMix images (a outside the box)
        for image in mixed:
            outside_values.add(int(torch.mode(image.flatten()).values))  # the box covers 30 %: a is the mode
    assert outside_values & {2, 3}, outside_values  # a foreground-centred sample was pasted around a box
    assert outside_values & {0, 1}


def _versemi(planned, tmp_path, **method):
    return make_trainer("VerSemiTrainer", planned, tmp_path, method=method)


def test_task_prompts_on_a_cutmix_are_scored_where_their_label_is_known(planned, tmp_path):
    trainer = _versemi(planned, tmp_path)
    batch = trainer.labeled_source[0]
    shape = tuple(batch["data"].shape[2:])
    mask = torch.zeros(1, 1, *shape)
    mask[..., 4:12, 8:24, 8:24] = 1
    target = torch.zeros(2, 1, *shape)
    target[0, :, :, :16] = 1  # a's label on the left half
    target[1, :, 8:, :, 16:] = 1  # b's label elsewhere
    labeled = {**batch, "target": target, "foreground": target}
    mixed_target = target[:1] * (1 - mask) + target[1:] * mask
    wrong = 1 - mixed_target
    # a's prompt right outside the box and wrong inside; b's prompt right inside and wrong outside
    prob_a = mixed_target * (1 - mask) + wrong * mask
    prob_b = mixed_target * mask + wrong * (1 - mask)
    plain = logits_from(torch.cat([target, target], 1))

    def task_mix(prompts, scoring="own_region"):
        trainer.settings["task_mix_scoring"] = scoring
        probs = torch.zeros(1, trainer.num_prompts, *shape)
        probs[0, prompts[0]], probs[0, prompts[1]] = prob_a[0, 0], prob_b[0, 0]
        labeled["prompt"] = torch.tensor(prompts)
        mixed_logits = logits_from(probs)
        return float(trainer.labeled_terms(labeled, plain, mixed_logits, mask)["task_mix"])

    assert task_mix([0, 1]) < 1e-3  # different tasks: each prompt only where its label is known
    assert task_mix([0, 1], "whole_image") > 0.2  # the public code's scoring counts the other region
    both_right = mixed_target[0, 0]
    trainer.settings["task_mix_scoring"] = "own_region"
    probs = torch.zeros(1, trainer.num_prompts, *shape)
    probs[0, 0] = both_right
    labeled["prompt"] = torch.tensor([0, 0])
    same_task = float(trainer.labeled_terms(labeled, plain, logits_from(probs), mask)["task_mix"])
    assert same_task < 1e-3  # same task: the full mixed label, which this prediction matches
    probs[0, 0] = prob_a[0, 0]
    assert float(trainer.labeled_terms(labeled, plain, logits_from(probs), mask)["task_mix"]) > 0.05


def test_stage_switch_and_rampup_schedule(planned, tmp_path):
    trainer = _versemi(planned, tmp_path)  # 10 epochs, stage 1 = round(0.3 * 10) = 3 epochs
    stages = []
    for epoch in range(10):
        trainer.epoch = epoch
        stages.append(trainer.stage)
    assert stages == [1, 1, 1] + [2] * 7
    assert trainer.unlabeled_from() == 3 * trainer.config.iterations_per_epoch
    ramp = 0.25 * 7  # rampup_fraction of the stage-2 epochs
    for epoch, expected in ((3, math.exp(-5)), (4, math.exp(-5 * (1 - 1 / ramp) ** 2)), (5, 1.0), (9, 1.0)):
        trainer.epoch = epoch
        assert trainer.consistency_weight() == pytest.approx(expected)
    trainer.settings["rampup"] = False
    trainer.epoch = 3
    assert trainer.consistency_weight() == 1.0


@pytest.mark.parametrize("detach", [False, True])
def test_detach_aggregate_stops_the_gradient_into_the_task_prompts(planned, tmp_path, detach):
    trainer = _versemi(planned, tmp_path, detach_aggregate=detach)
    trainer.epoch = 9
    torch.manual_seed(0)
    logits = torch.randn(2, trainer.num_prompts, 2, 4, 6, 6, requires_grad=True)
    foreground = (torch.rand(2, 1, 4, 6, 6) > 0.5).float()
    paste = torch.ones(2, 1, 4, 6, 6)
    trainer.unlabeled_terms(logits, foreground, paste)["consistency"].backward()
    real = logits.grad[:, trainer.real_prompts].abs().sum()
    assert logits.grad[:, trainer.synthetic_prompt].abs().sum() > 0
    assert (real == 0) if detach else (real > 0)


def test_stage2_task_mix_switch_and_paper_preset(planned, tmp_path):
    trainer = _versemi(planned, tmp_path, preset="paper")
    assert trainer.settings == {**DEFAULTS, **PRESETS["paper"]} and trainer.settings["stage2_task_mix"] is False
    labeled, unlabeled = trainer.labeled_source[0], trainer.unlabeled_source[0]
    trainer.epoch = 0
    assert "task_mix" in trainer.train_step(labeled, None)
    trainer.epoch = 9
    assert set(trainer.train_step(labeled, unlabeled)) == {"supervised", "synthetic", "consistency", "box", "loss"}
    assert parse_method("paper") == {"preset": "paper"}
    assert parse_method('{"preset": "paper", "weight_box": 0.5}') == {"preset": "paper", "weight_box": 0.5}
    kept = _versemi(planned, tmp_path / "kept", stage2_task_mix=True)  # the default drops it, as the paper
    kept.epoch = 9
    assert "task_mix" in kept.train_step(labeled, unlabeled)


def test_every_resolved_setting_is_saved_so_continue_keeps_it(planned, results):
    """A run stores all its method settings, not only those given: a later default change must not
    change a resumed run's loss. Runs saved before (only the given settings) say which they take
    from this version's defaults."""
    args = ["3d_fullres", "0", "--plans-root", str(planned), *TINY, "--iterations-per-epoch", "1",
            "--method", '{"preset": "paper", "weight_consistency": 0.5}']
    assert train_main([*args, "--epochs", "1"]) == 0
    folder = results / TOY_EXPERIMENT / "VerSemiTrainer__3d_fullres" / "fold_0"
    latest = folder / "checkpoint_latest.pth"
    state = torch.load(latest, weights_only=False)
    assert state["config"]["method"] == {"preset": "paper", **DEFAULTS, **PRESETS["paper"], "weight_consistency": 0.5}
    # as an earlier version saved it: only the settings given
    state["config"]["method"] = {"weight_consistency": 0.5}
    torch.save(state, latest)
    assert train_main(["3d_fullres", "0", "--plans-root", str(planned), "--continue", "--epochs", "2"]) == 0
    log = (folder / "training_log.txt").read_text(encoding="utf-8")
    line = next(line for line in log.splitlines() if "not saved with this run" in line)
    assert "stage2_task_mix=False" in line and "weight_consistency" not in line
    final = torch.load(folder / "checkpoint_final.pth", weights_only=False)["config"]["method"]
    assert final == {**DEFAULTS, "weight_consistency": 0.5}  # pinned from now on
    assert unsaved(DEFAULTS, PRESETS, {"preset": "paper"}) == sorted(set(DEFAULTS) - set(PRESETS["paper"]))
    assert unsaved(DEFAULTS, PRESETS, {}) == sorted(DEFAULTS)


def test_unknown_or_mistyped_method_settings_are_refused(planned, results, capsys):
    with pytest.raises(InputError, match="known: .*stage1_fraction"):
        resolve_method_settings("VerSemiTrainer", DEFAULTS, PRESETS, {"stage1_fracton": 0.5})
    with pytest.raises(InputError, match="wrong type"):
        resolve_method_settings("VerSemiTrainer", DEFAULTS, PRESETS, {"detach_aggregate": "yes"})
    with pytest.raises(InputError, match="no preset 'papr'"):
        resolve_method_settings("VerSemiTrainer", DEFAULTS, PRESETS, {"preset": "papr"})
    assert train_main(["3d_fullres", "0", "--plans-root", str(planned), *TINY, "--epochs", "1",
                       "--method", '{"weight_consistancy": 2}']) == 2
    err = capsys.readouterr().err
    assert "weight_consistancy" in err and "weight_consistency" in err
    assert train_main(["3d_fullres", "0", "--plans-root", str(planned), *TINY, "-tr", "SupervisedTrainer",
                       "--method", '{"stage1_fraction": 0.5}']) == 2
    assert "known: none" in capsys.readouterr().err


# ----- every trainer -----
@pytest.mark.parametrize("name", ["SupervisedTrainer", "VerSemiTrainer", "MeanTeacherTrainer"])
def test_deep_supervision_trains_every_trainer(planned, tmp_path, name):
    torch.manual_seed(0)
    trainer = make_trainer(name, planned, tmp_path, deep_supervision=True)
    assert trainer.model.deep_supervision
    trainer.epoch = 9
    losses, _ = fit_fixed_batch(trainer, 10)
    deep_head = trainer.model.prompt_head.preclassifiers[1][2].weight.grad
    assert deep_head is not None and deep_head.abs().sum() > 0  # the lower resolution is supervised
    assert losses[-1] < 0.9 * losses[0], losses


def test_every_loss_term_is_logged_per_epoch(planned, results):
    assert train_main(["3d_fullres", "0", "--plans-root", str(planned), *TINY, "--epochs", "2",
                       "--iterations-per-epoch", "2", "--method", '{"stage1_fraction": 0.5}']) == 0
    folder = results / TOY_EXPERIMENT / "VerSemiTrainer__3d_fullres" / "fold_0"
    history = torch.load(folder / "checkpoint_final.pth", weights_only=False)["history"]
    assert set(history["terms"][0]) == {"supervised", "synthetic", "task_mix", "loss"}
    assert set(history["terms"][1]) == {"supervised", "synthetic", "consistency", "box", "loss"}  # the paper's stage 2
    log = (folder / "training_log.txt").read_text(encoding="utf-8")
    assert "consistency" in log and "box" in log
    assert (folder / "progress.png").stat().st_size > 0


@pytest.mark.parametrize("stage1_fraction,expected", [(1.0, 0), (0.5, 2)])
def test_unlabeled_stream_is_loaded_only_when_used(planned, tmp_path, monkeypatch, stage1_fraction, expected):
    drawn = {"labeled": 0, "unlabeled": 0}
    real = data_module.BatchSource.__getitem__

    def counting(self, iteration):
        drawn[self.stream] = drawn.get(self.stream, 0) + 1
        return real(self, iteration)

    monkeypatch.setattr(data_module.BatchSource, "__getitem__", counting)
    trainer = make_trainer("VerSemiTrainer", planned, tmp_path, epochs=2, iterations_per_epoch=2, val_iterations=1,
                           method={"stage1_fraction": stage1_fraction})
    trainer.run()
    assert drawn["labeled"] == 4 and drawn["unlabeled"] == expected


def _two_label_plans(planned) -> dict:
    """The toy plan with DemoLA given a second structure (label 2), so it has two prompts."""
    plans = json.loads((planned / TOY_EXPERIMENT / "plans.json").read_text(encoding="utf-8"))
    prompts = [p for p in plans["prompts"] if p["dataset"] is not None]
    extra = {**prompts[0], "label": "vein", "label_value": 2}
    ordered = [prompts[0], extra] + prompts[1:]
    synthetic = [p for p in plans["prompts"] if p["dataset"] is None][0]
    plans["prompts"] = [{**p, "index": i} for i, p in enumerate(ordered + [synthetic])]
    plans["num_prompts"] = len(plans["prompts"])
    plans["synthetic_prompt"] = plans["num_prompts"] - 1
    return plans


def test_mean_teacher_uses_every_prompt_of_a_two_label_dataset(planned, tmp_path):
    plans = _two_label_plans(planned)
    trainer = make_trainer("MeanTeacherTrainer", planned, tmp_path, plans=plans, batch_size=2)
    trainer.epoch = 9
    labeled, unlabeled = trainer.labeled_source[0], trainer.unlabeled_source[0]
    unlabeled["dataset"] = torch.tensor([0, 0])  # both unlabeled samples from DemoLA (prompts 0 and 1)
    second = {"value": 0.0}

    class FakeTeacher(torch.nn.Module):
        """Certain background for every prompt, except the second DemoLA prompt at a chosen level."""

        def forward(self, x, prompts):
            probs = torch.zeros(x.shape[0], *prompts.shape[1:], *x.shape[2:])
            if prompts.dim() == 2:
                probs[:, (prompts[0] == 1).nonzero()[0]] = second["value"]
            return logits_from(probs)

    trainer.teacher = FakeTeacher()
    values = []
    for level in (0.0, 1.0):
        second["value"] = level
        torch.manual_seed(0)
        values.append(float(trainer.train_step(labeled, unlabeled)["consistency"]))
    assert values[1] > values[0] + 1e-4, values


@pytest.mark.slow
def test_mean_teacher_resumes_exactly_student_and_teacher_weights(planned, results, tmp_path):
    args = ["3d_fullres", "0", "--plans-root", str(planned), "-tr", "MeanTeacherTrainer", "--epochs", "3",
            "--iterations-per-epoch", "3", *TINY, "--num-workers", "1"]
    uninterrupted, resumed = train_killed_and_resumed(args, "MeanTeacherTrainer", results, tmp_path)
    assert_same_weights(uninterrupted, resumed, ("network", "teacher"))
    first = next(iter(uninterrupted["extra"]["teacher"].values()))
    assert not torch.equal(first, next(iter(uninterrupted["network"].values())))  # the teacher is its own state


# ----- precision and time budget -----
def _cpu_with_bf16_units(monkeypatch, present: bool) -> None:
    """Make ``auto`` see a CPU with (or without) bf16 units, whatever this machine has, so both
    branches run on every machine."""
    monkeypatch.setattr(sys.modules[autocast_dtype.__module__], "cpu_has_bf16", lambda: present)


@pytest.mark.parametrize("bf16_units", [True, False])
def test_precision_auto_follows_the_cpus_bf16_units(monkeypatch, bf16_units):
    _cpu_with_bf16_units(monkeypatch, bf16_units)
    assert autocast_dtype("auto", True, torch.device("cpu")) == (torch.bfloat16 if bf16_units else None)


def test_precision_auto_trains_in_bf16_on_a_cpu_with_bf16_units(planned, tmp_path, monkeypatch):
    _cpu_with_bf16_units(monkeypatch, True)
    trainer = make_trainer("VerSemiTrainer", planned, tmp_path, precision="auto")
    assert trainer.autocast_dtype == torch.bfloat16
    step = trainer.optimize(0, trainer.labeled_source[0], trainer.unlabeled_source[0])
    assert math.isfinite(step["loss"])


def test_precision_choice():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", True, cpu) == (torch.bfloat16 if cpu_has_bf16() else None)
    assert autocast_dtype("auto", False, cpu) is None
    assert autocast_dtype("fp32", True, cpu) is None
    assert autocast_dtype("bf16", True, cpu) == torch.bfloat16
    with pytest.raises(InputError, match="CUDA"):
        autocast_dtype("fp16", True, cpu)


def test_a_bf16_step_trains(planned, tmp_path):
    trainer = make_trainer("VerSemiTrainer", planned, tmp_path, precision="bf16")
    assert trainer.autocast_dtype == torch.bfloat16
    trainer.epoch = 9
    step = trainer.optimize(0, trainer.labeled_source[0], trainer.unlabeled_source[0])
    assert math.isfinite(step["loss"]) and {"consistency", "box"} <= set(step)


@pytest.mark.slow
def test_time_budget_warmup_leaves_no_trace_and_fixes_the_schedule(planned, tmp_path):
    trainer = make_trainer("VerSemiTrainer", planned, tmp_path, time_budget=2.0, method={"stage1_fraction": 0.5})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    record = fit_schedule(trainer)
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.epoch == 0 and not trainer.optimizer.state
    assert len(record["phase_seconds"]) == 2  # VerSemi's two stages are timed separately
    assert trainer.config.epochs == record["epochs"] >= 1
    assert record["iterations"] == trainer.config.epochs * trainer.config.iterations_per_epoch
    planned_seconds = record["warmup_seconds"] + record["epochs"] * (
        record["iterations_per_epoch"] * record["seconds_per_iteration"] + record["epoch_overhead_seconds"])
    assert planned_seconds <= 2.0 * 60
    # the load the timing saw is recorded beside the iterations it set
    assert record["load_while_timing"] >= 0 and f"CPU load {record['load_while_timing']:.1f}" in record["message"]


@pytest.mark.slow
def test_time_budget_is_stored_and_kept_on_continue(planned, results, capsys):
    # a minute: 0.3 was less than the setup and timing took on a loaded 2-core machine (22 s)
    args = ["3d_fullres", "0", "--plans-root", str(planned), *TINY, "-tr", "SupervisedTrainer", "--time-budget", "1"]
    assert train_main(args) == 0
    out = capsys.readouterr().out
    assert "time budget 1 min" in out
    folder = results / TOY_EXPERIMENT / "SupervisedTrainer__3d_fullres" / "fold_0"
    state = torch.load(folder / "checkpoint_final.pth", weights_only=False)
    budget = state["config"]["budget"]
    assert state["config"]["epochs"] == budget["epochs"] == state["epoch"]
    assert state["config"]["iterations_per_epoch"] == budget["iterations_per_epoch"]
    assert "time budget 1 min" in (folder / "training_log.txt").read_text(encoding="utf-8")


@pytest.mark.slow
def test_too_small_time_budget_is_a_clear_error(planned, results, capsys):
    assert train_main(["3d_fullres", "0", "--plans-root", str(planned), *TINY, "--time-budget", "0.001"]) == 2
    assert "does not cover one epoch" in capsys.readouterr().err
    assert train_main(["3d_fullres", "0", "--plans-root", str(planned), *TINY, "--time-budget", "-1"]) == 2


def test_stage2_without_labeled_cutmix_sends_one_image_set_fewer(planned, tmp_path):
    trainer = _versemi(planned, tmp_path, stage2_labeled_cutmix=False, stage2_task_mix=False)
    calls = []
    trainer.model.backbone.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    labeled, unlabeled = trainer.labeled_source[0], trainer.unlabeled_source[0]
    trainer.epoch = 0
    assert "synthetic" in trainer.train_step(labeled, None)  # stage 1 keeps its CutMix
    trainer.epoch = 9
    assert set(trainer.train_step(labeled, unlabeled)) == {"supervised", "consistency", "box", "loss"}
    assert calls == [3, 4]  # stage 1: 2 labeled + 1 CutMix; stage 2: 2 labeled + 2 pastes
