"""Several networks in one trainer (each with its own optimizer and schedule, one backward, DDP,
exact resume, the time-budget snapshot, prediction from every member or a chosen one) and the
methods built on it: C3S3 (competition, sharpened pseudo-labels, voxel contrast) and MEDL
(evidential fusion, Fisher-weighted evidential loss, asymptotic voxel weights)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from versemi.bundles.export import export_bundle
from versemi.cli import predict_main
from versemi.errors import InputError
from versemi.inference import load_models
from versemi.inference.sliding_window import ensemble_probabilities
from versemi.model.config import TrainingConfig
from versemi.training.evidential import asymptotic_weight, fisher_evidential_loss, fuse, opinion
from versemi.training.losses import finest, multiscale, voxel_contrast
from versemi.training.pseudo_labels import sharpened
from versemi.training.trainer import Trainer
from versemi.training.trainers import c3s3
from versemi.training.trainers.c3s3 import project_rows, projection_head, voxel_rows
from versemi.training.trainers.medl import class_aware_fusion, class_reliability

from conftest import TOY_EXPERIMENT, assert_same_weights, fit_fixed_batch, make_trainer, train_killed_and_resumed

# a few iterations: without --supervised-warm-up 0 (auto) a method would train supervised throughout
TINY = ["--patch-size", "16", "32", "32", "--batch-size", "2", "--features", "4", "8", "16", "--num-workers", "0",
        "--val-iterations", "1", "--supervised-warm-up", "0"]
pytestmark = pytest.mark.usefixtures("one_thread")


class TwoNetworkTrainer(Trainer):
    """A U-Net and a V-Net member, each supervised, and a head used in training only."""

    network_name = "unet"

    def on_train_start(self) -> None:
        self.second = self.add_network("vnet", {**self.network_plan(), "architecture": "vnet"})
        self.head = self.add_network("head", module=torch.nn.Conv3d(2, 2, 1))

    def train_step(self, labeled: dict, unlabeled: dict | None) -> dict[str, torch.Tensor]:
        x, prompt, target = labeled["data"], labeled["prompt"], labeled["target"]
        second = self.second(x, prompt)
        terms = {"unet": multiscale(self.loss, self.network(x, prompt), target),
                 "vnet": multiscale(self.loss, second, target),
                 "head": 0.1 * self.loss(self.head(finest(second)), target)}
        terms["loss"] = sum(terms.values())
        return terms


def _plans(planned: Path) -> dict:
    return json.loads((planned / TOY_EXPERIMENT / "plans.json").read_text(encoding="utf-8"))


def two_networks(planned: Path, folder: Path, setup: bool = True, **config) -> TwoNetworkTrainer:
    settings = dict(epochs=2, iterations_per_epoch=2, val_iterations=1, patch_size=[16, 32, 32], batch_size=2,
                    features=[4, 8, 16], num_workers=0, optimizer="adam", lr=3e-3)
    settings.update(config)
    trainer = TwoNetworkTrainer(_plans(planned), planned, "3d_fullres", "0", folder, TrainingConfig(**settings))
    if setup:
        trainer.setup()
    return trainer


def _weights(module: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _changed(before: dict, module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


# ----- the loop with several networks -----
def test_one_step_moves_every_network_with_its_own_optimizer(planned, tmp_path):
    trainer = two_networks(planned, tmp_path / "run")
    assert set(trainer.extra_networks) == {"vnet", "head"} and set(trainer.members()) == {"unet", "vnet"}
    assert trainer.extra_networks["head"].network_plan is None
    models = [trainer.model] + [e.model for e in trainer.extra_networks.values()]
    before = [_weights(m) for m in models]
    step = trainer.optimize(0, trainer.labeled_source[0], None)
    assert {"unet", "vnet", "head", "loss"} <= set(step)
    assert all(_changed(b, m) for b, m in zip(before, models))
    for extra in trainer.extra_networks.values():  # the main one's settings, its own parameters and state
        assert type(extra.optimizer) is type(trainer.optimizer)
        assert extra.optimizer.param_groups[0]["lr"] == trainer.optimizer.param_groups[0]["lr"]
        owned = {id(p) for p in extra.model.parameters()}
        assert {id(p) for g in extra.optimizer.param_groups for p in g["params"]} == owned
        assert extra.optimizer.state
    trainer.train_mode(False)
    assert not any(m.training for m in models)
    trainer.train_mode(True)
    assert all(m.training for m in models)


def test_names_are_unique_and_a_network_needs_a_plan_or_a_module(planned, tmp_path):
    trainer = two_networks(planned, tmp_path / "run")
    with pytest.raises(ValueError, match="taken"):
        trainer.add_network("vnet", module=torch.nn.Conv3d(1, 1, 1))
    with pytest.raises(ValueError, match="taken"):
        trainer.add_network("unet", module=torch.nn.Conv3d(1, 1, 1))
    with pytest.raises(ValueError, match="exactly one"):
        trainer.add_network("third")


def test_time_budget_snapshot_puts_every_network_back(planned, tmp_path):
    trainer = two_networks(planned, tmp_path / "run")
    models = [trainer.model] + [e.model for e in trainer.extra_networks.values()]
    before = [_weights(m) for m in models]
    state = trainer.snapshot()
    trainer.optimize(0, trainer.labeled_source[0], None)
    trainer.restore(state)
    assert not any(_changed(b, m) for b, m in zip(before, models))
    assert not trainer.optimizer.state and not any(e.optimizer.state for e in trainer.extra_networks.values())


def test_every_network_follows_the_schedule_and_is_checkpointed(planned, tmp_path):
    trainer = two_networks(planned, tmp_path / "run", setup=False, epochs=2, poly_exponent=1.0)
    trainer.run()
    state = torch.load(tmp_path / "run" / "checkpoint_final.pth", weights_only=False)
    assert state["network_name"] == "unet" and set(state["networks"]) == {"vnet", "head"}
    assert state["networks"]["vnet"]["network_plan"]["architecture"] == "vnet"
    assert state["networks"]["head"]["network_plan"] is None
    lrs = [e.optimizer.param_groups[0]["lr"] for e in trainer.extra_networks.values()]
    assert lrs == [pytest.approx(trainer.optimizer.param_groups[0]["lr"])] * 2
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 * 0.5)  # poly decay, 2 epochs done
    for name, extra in trainer.extra_networks.items():
        assert all(torch.equal(v, state["networks"][name]["network"][k]) for k, v in extra.model.state_dict().items())


# ----- prediction -----
@pytest.mark.slow
def test_prediction_averages_the_members_or_uses_the_chosen_one(planned, results, tmp_path, toy_raw_master, capsys):
    folder = results / TOY_EXPERIMENT / "TwoNetworkTrainer__3d_fullres" / "fold_0"
    trainer = two_networks(planned, folder)
    trainer.optimize(0, trainer.labeled_source[0], None)  # the two members differ
    trainer.save("final")
    path = folder / "checkpoint_final.pth"
    both = load_models(path)
    assert both.members == ["unet", "vnet"] and both.folds == ["0", "0"]
    assert [type(m.network.backbone).__name__ for m in both.models] == ["UNetBackbone", "VNetBackbone"]
    singles = [load_models(path, member=name) for name in ("unet", "vnet")]
    assert [s.members for s in singles] == [["unet"], ["vnet"]]
    data = np.random.default_rng(0).normal(size=(1, 16, 32, 32)).astype(np.float32)
    for ensemble in (both, *singles):
        ensemble.precision = "fp32"
    mean = ensemble_probabilities(both, data, 0, mirroring=False)
    each = [ensemble_probabilities(s, data, 0, mirroring=False) for s in singles]
    assert not torch.allclose(each[0], each[1], atol=1e-3)
    assert torch.allclose(mean, (each[0] + each[1]) / 2, atol=1e-6)
    with pytest.raises(InputError, match="members: unet, vnet"):
        load_models(path, member="head")  # trained beside them, but not a member
    image = sorted((toy_raw_master / "DemoLA" / "imagesTs").glob("*_0000.nii.gz"))[0]
    common = ["-i", str(image), "-p", "DemoLA", "-e", TOY_EXPERIMENT, "-tr", "TwoNetworkTrainer", "--plans-root",
              str(planned), "--no-mirroring", "--device", "cpu", "--precision", "fp32", "--quiet"]
    assert predict_main([*common, "-o", str(tmp_path / "vnet"), "--member", "vnet"]) == 0
    assert len(list((tmp_path / "vnet").glob("*.nii.gz"))) == 1
    assert predict_main([*common, "-o", str(tmp_path / "nope"), "--member", "nope"]) == 2
    assert "holds no member 'nope' (members: unet, vnet)" in capsys.readouterr().err
    for member, networks in ((None, {"0", "1"}), ("vnet", {"0"})):  # the bundle holds the chosen networks
        bundle = export_bundle(tmp_path / f"bundle_{member}", "DemoLA", TOY_EXPERIMENT, trainer="TwoNetworkTrainer",
                               plans_root=planned, member=member)
        weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
        assert {key.split(".")[1] for key in weights if key.startswith("networks.")} == networks


def test_checkpoints_of_one_network_still_load_as_one_model(planned, tmp_path):
    from versemi.training.trainers import find_trainer

    settings = dict(patch_size=[16, 32, 32], batch_size=2, features=[4, 8, 16], num_workers=0)
    trainer = find_trainer("SupervisedTrainer")(_plans(planned), planned, "3d_fullres", "0", tmp_path / "one",
                                                TrainingConfig(**settings))
    trainer.setup()
    trainer.save("final")
    path = tmp_path / "one" / "checkpoint_final.pth"
    state = torch.load(path, weights_only=False)
    assert state["networks"] == {} and state["network_name"] == "main"
    older = {k: v for k, v in state.items() if k not in ("networks", "network_name")}  # an older version's
    torch.save(older, tmp_path / "older.pth")
    for source in (path, tmp_path / "older.pth"):
        ensemble = load_models(source)
        assert ensemble.members == [None] and len(ensemble.models) == 1
    assert load_models(path, member="main").members == [None]


# ----- C3S3 -----
C3S3 = {"projector_dim": 8}  # a narrow projection head keeps the toy steps fast


def test_voxel_contrast_pulls_positives_together_and_pushes_negatives_apart():
    similarity = torch.tensor([[0.9, 0.8, -0.5, 0.1]])
    positive = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    t = 0.1
    d = 1 + 1 + np.exp(-0.5 / t) + np.exp(0.1 / t)  # the positives add exp(0) each
    expected = np.mean([-np.log(np.exp(0.9 / t) / (np.exp(0.9 / t) + d)),
                        -np.log(np.exp(0.8 / t) / (np.exp(0.8 / t) + d)), -np.log(1 / (1 + d)), -np.log(1 / (1 + d))])
    assert float(voxel_contrast(similarity, positive, t)) == pytest.approx(expected, rel=1e-5)
    similarity.requires_grad_(True)
    voxel_contrast(similarity, positive, t).backward()
    assert (similarity.grad[0, :2] < 0).all() and (similarity.grad[0, 2:] > 0).all()
    assert similarity.grad[0, 3] > similarity.grad[0, 2]  # the most similar negative is pushed hardest


def test_voxel_rows_line_up_the_same_voxel_across_views_and_project_like_the_whole_volume():
    torch.manual_seed(0)
    n_views, n, channels, shape = 2, 3, 4, (2, 3, 5)
    volume = torch.randn(n_views * n, channels, *shape)
    rows = voxel_rows(volume, n_views)
    assert rows.shape == (n_views, n * 30, channels)
    for view, sample, z, y, x in [(0, 0, 0, 0, 0), (1, 2, 1, 2, 4), (1, 1, 0, 2, 3)]:
        row = sample * 30 + z * 15 + y * 5 + x
        assert torch.equal(rows[view, row], volume[view * n + sample, :, z, y, x])
    head = projection_head(channels, 3)
    whole = F.normalize(head(volume), dim=1)  # the head over the full-resolution volume
    assert torch.allclose(project_rows(head, rows), voxel_rows(whole, n_views), atol=1e-5)
    chosen = torch.tensor([5, 0, 77])
    assert torch.allclose(project_rows(head, rows[:, chosen]), voxel_rows(whole, n_views)[:, chosen], atol=1e-5)


def test_c3s3_contrasts_the_chosen_number_of_voxels(planned, tmp_path, monkeypatch):
    trainer = make_trainer("C3S3Trainer", planned, tmp_path, method={**C3S3, "contrast_voxels": 50})
    torch.manual_seed(0)
    first, second = trainer.contrasted_voxels(1000, torch.device("cpu")), trainer.contrasted_voxels(1000, "cpu")
    assert len(first) == 50 == len(set(first.tolist())) and not torch.equal(first, second)  # new voxels every step
    assert trainer.contrasted_voxels(40, torch.device("cpu")) == slice(None)  # fewer voxels than asked: all
    seen = []
    real = c3s3.outcome_contrast

    def recording(unit_a, unit_b, *rest):
        seen.append(unit_a.shape[0])
        return real(unit_a, unit_b, *rest)

    monkeypatch.setattr(c3s3, "outcome_contrast", recording)
    terms = trainer.train_step(trainer.labeled_source[0], trainer.unlabeled_source[0])
    assert seen == [50] * 4 and torch.isfinite(terms["contrastive"])  # two views: four pairs
    every = make_trainer("C3S3Trainer", planned, tmp_path / "every", method={**C3S3, "contrast_voxels": 0})
    assert every.contrasted_voxels(10 ** 6, torch.device("cpu")) == slice(None)


def test_sharpening_pushes_soft_labels_to_zero_and_one():
    p = torch.tensor([0.3, 0.5, 0.9])
    expected = p ** 10 / (p ** 10 + (1 - p) ** 10)
    assert torch.allclose(sharpened(p, 0.1), expected, atol=1e-6)
    assert torch.allclose(sharpened(p, 1.0), p, atol=1e-6)


@pytest.mark.slow
def test_c3s3_lowers_its_loss_on_a_fixed_batch(planned, tmp_path):
    torch.manual_seed(0)
    trainer = make_trainer("C3S3Trainer", planned, tmp_path, method=C3S3)
    assert set(trainer.members()) == {"unet", "vnet"}
    assert set(trainer.extra_networks) == {"vnet", "projector_unet", "projector_vnet"}
    trainer.epoch = 5
    supervised, real_step = [], trainer.train_step

    def recording_step(*batches):
        terms = real_step(*batches)
        supervised.append(float(terms["supervised"].detach()))
        return terms

    trainer.train_step = recording_step
    losses, terms = fit_fixed_batch(trainer, 12)
    assert {"supervised", "pseudo", "consistency", "contrastive", "second_teaches"} <= set(terms)
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in terms.values())
    # the contrastive term's positives are the networks' own predictions: when a voxel's prediction
    # flips, the term's floor moves, so the total falls overall but not at every step
    assert supervised[-1] < 0.7 * supervised[0], supervised
    assert losses[-1] < losses[0], losses


def test_c3s3_the_network_with_the_lower_supervised_loss_teaches(planned, tmp_path):
    labeled = None
    for better in ("unet", "vnet"):
        torch.manual_seed(0)
        trainer = make_trainer("C3S3Trainer", planned, tmp_path / better, method={**C3S3, "two_views": False})
        trainer.epoch = 9
        labeled, unlabeled = trainer.labeled_source[0], trainer.unlabeled_source[0]
        models = {"unet": trainer.model, "vnet": trainer.extra_networks["vnet"].model}
        fitted = torch.optim.Adam(models[better].parameters(), lr=3e-3)
        for _ in range(6):  # this network alone learns the labeled batch
            fitted.zero_grad()
            trainer.loss(models[better](labeled["data"], labeled["prompt"]), labeled["target"]).backward()
            fitted.step()
        alpha = trainer.settings["alpha"]
        with torch.no_grad():
            scores = {name: float(alpha * trainer.loss.cross_entropy(logits, labeled["target"])
                                  + (1 - alpha) * trainer.loss.dice(logits, labeled["target"]))
                      for name, model in models.items() for logits in [model(labeled["data"], labeled["prompt"])]}
        assert min(scores, key=scores.get) == better
        for model in models.values():
            model.zero_grad(set_to_none=True)
        terms = trainer.train_step(labeled, unlabeled)
        assert float(terms["second_teaches"]) == float(better == "vnet")
        terms["pseudo"].backward()  # the sharpened targets come from the teacher: only the other one learns
        student = models["vnet" if better == "unet" else "unet"]
        assert all(p.grad is None or not p.grad.any() for p in models[better].parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_bad_c3s3_settings_get_clear_errors(planned, tmp_path):
    with pytest.raises(InputError, match="alpha 1.5 is not in"):
        make_trainer("C3S3Trainer", planned, tmp_path, method={"alpha": 1.5})
    with pytest.raises(InputError, match="second_architecture 'resnet'"):
        make_trainer("C3S3Trainer", planned, tmp_path, method={"second_architecture": "resnet"})
    with pytest.raises(InputError, match="contrast_voxels -1 is not a whole number >= 0"):
        make_trainer("C3S3Trainer", planned, tmp_path, method={"contrast_voxels": -1})
    with pytest.raises(InputError, match="temperature 0 is not positive"):
        make_trainer("C3S3Trainer", planned, tmp_path, method={"temperature": 0})
    with pytest.raises(InputError, match="not a multiple of 16"):
        make_trainer("C3S3Trainer", planned, tmp_path, patch_size=[8, 32, 32],
                     method={**C3S3, "second_architecture": "vnet"})
    # by default the V-Net where the patch allows it, and a second U-Net where it does not
    assert make_trainer("C3S3Trainer", planned, tmp_path / "fits", method=C3S3).second_name == "vnet"
    assert make_trainer("MEDLTrainer", planned, tmp_path / "not", patch_size=[8, 32, 32]).second_name == "unet2"
    with pytest.raises(InputError, match="known: .*weight_contrastive"):
        make_trainer("C3S3Trainer", planned, tmp_path, method={"weight_contrast": 1.0})
    # the V-Net's fallback: a second U-Net; without the contrastive term there are no projection heads
    trainer = make_trainer("C3S3Trainer", planned, tmp_path, patch_size=[8, 32, 32],
                           method={"second_architecture": "unet", "weight_contrastive": 0.0})
    assert set(trainer.extra_networks) == {"unet2"}
    assert "contrastive" not in trainer.train_step(trainer.labeled_source[0], trainer.unlabeled_source[0])


@pytest.mark.slow
def test_c3s3_resumes_exactly_after_a_kill(planned, results, tmp_path):
    # 2 epochs of 3 iterations: the kill (iteration 5) comes after the checkpoint of epoch 1
    args = ["3d_fullres", "0", "--plans-root", str(planned), "-tr", "C3S3Trainer", "--epochs", "2",
            "--iterations-per-epoch", "3", *TINY, "--num-workers", "1", "--unlabeled-batch-size", "2",
            "--method", json.dumps(C3S3)]
    uninterrupted, resumed = train_killed_and_resumed(args, "C3S3Trainer", results, tmp_path)
    assert_same_weights(uninterrupted, resumed, ("network", "networks"))
    assert set(uninterrupted["networks"]) == {"vnet", "projector_unet", "projector_vnet"}
    assert uninterrupted["history"]["terms"][-1].keys() >= {"supervised", "pseudo", "contrastive", "second_teaches"}


@pytest.mark.slow
def test_c3s3_trains_with_ddp_on_two_cpu_processes(planned, results, tmp_path):
    # each process keeps its final weights: the processes see other batches, so they agree only if
    # every network's gradients are averaged across them
    script = tmp_path / "train_and_keep.py"
    script.write_text(f"""
import sys
import torch
import versemi.training.trainer as loop
from versemi.training.run import train
real_run = loop.Trainer.run
def run_and_keep(self, resume=False):
    real_run(self, resume)
    weights = {{name: e.model.state_dict() for name, e in self.extra_networks.items()}}
    torch.save({{"unet": self.model.state_dict(), **weights}}, {str(tmp_path)!r} + f"/rank{{self.rank}}.pth")
loop.Trainer.run = run_and_keep
train(sys.argv[1:])
""")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               "3d_fullres", "1", "--plans-root", str(planned), "--epochs", "1", "--iterations-per-epoch", "2",
               "--device", "cpu", *TINY, "--batch-size", "4", "-tr", "C3S3Trainer", "--method", json.dumps(C3S3)]
    run = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace",
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = results / TOY_EXPERIMENT / "C3S3Trainer__3d_fullres" / "fold_1"
    assert "batch 2 x 2 process(es)" in (folder / "training_log.txt").read_text(encoding="utf-8")
    first, second = (torch.load(tmp_path / f"rank{r}.pth", weights_only=False) for r in (0, 1))
    assert first.keys() == second.keys() == {"unet", "vnet", "projector_unet", "projector_vnet"}
    for name in first:
        assert all(torch.equal(v, second[name][k]) for k, v in first[name].items()), name
    initial = make_trainer("C3S3Trainer", planned, tmp_path / "initial", method=C3S3).extra_networks["vnet"].model
    assert not all(torch.equal(v, first["vnet"][k]) for k, v in initial.state_dict().items())  # they did train


# ----- MEDL -----
def _alpha(background: float, foreground: float) -> torch.Tensor:
    """One voxel's Dirichlet (1, 2, 1, 1, 1) from its evidence per class."""
    return torch.tensor([background + 1.0, foreground + 1.0]).view(1, 2, 1, 1, 1)


def test_evidential_fusion_on_hand_made_opinions():
    fg = _alpha(0, 9)  # belief 9/11 in the foreground, uncertainty 2/11
    fused = fuse(fg, fg)
    belief, uncertainty = opinion(fused)
    assert float(belief[0, 1]) == pytest.approx(117 / 121) and float(uncertainty) == pytest.approx(4 / 121)
    assert float(belief.sum() + uncertainty) == pytest.approx(1.0)  # agreeing sources: surer than either
    unsure_bg = _alpha(1, 0)
    assert int(opinion(fuse(_alpha(0, 20), unsure_bg))[0].argmax(1)) == 1  # the confident source prevails
    bg = _alpha(9, 0)
    tie = opinion(fuse(fg, bg))[0]
    assert float(tie[0, 0]) == pytest.approx(float(tie[0, 1]))  # a conflict between equals: undecided
    same, weak_fg = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.2])
    # class-aware: the source less reliable on the class it claims is discounted on that class only
    assert int(opinion(class_aware_fusion(fg, bg, weak_fg, same))[0].argmax(1)) == 0
    assert int(opinion(class_aware_fusion(fg, bg, same, torch.tensor([0.2, 1.0])))[0].argmax(1)) == 1
    # reliability is relative to the better source: two equally weak sources keep all their evidence
    assert torch.allclose(class_aware_fusion(fg, bg, weak_fg, weak_fg), fuse(_alpha(0, 9), _alpha(9, 0)))


def test_class_reliability_is_the_soft_dice_per_class():
    target = torch.zeros(1, 1, 2, 2, 2)
    target[..., 0, :, :] = 1
    right = torch.cat([1 + 99 * (1 - target), 1 + 99 * target], 1)  # much evidence for the true class
    wrong = torch.cat([1 + 99 * target, 1 + 99 * (1 - target)], 1)
    assert (class_reliability(right, target) > 0.95).all() and (class_reliability(wrong, target) < 0.05).all()


def test_fisher_evidential_loss_and_the_asymptotic_weights():
    alpha, target = _alpha(0, 10), torch.zeros(1, 1, 1, 1, 1)  # sure of the foreground, labeled background
    p = np.array([1 / 12, 11 / 12])
    y = np.array([1.0, 0.0])
    trigamma = np.array([float(torch.polygamma(1, torch.tensor(a))) for a in (1.0, 11.0)])
    expected = (((y - p) ** 2 + p * (1 - p) / 13) * trigamma).sum()
    assert float(fisher_evidential_loss(alpha, target)) == pytest.approx(expected, rel=1e-5)
    assert trigamma[1] < 0.1 < 1.6 < trigamma[0]  # the class it is sure of weighs little: not over-penalised
    uncertainty = torch.tensor([0.1, 0.9])
    assert asymptotic_weight(uncertainty, 0.0).tolist() == pytest.approx([0.9, 0.1])  # first the reliable voxels
    assert asymptotic_weight(uncertainty, 0.5).tolist() == pytest.approx([0.5, 0.5])
    assert asymptotic_weight(uncertainty, 1.0).tolist() == pytest.approx([0.1, 0.9])  # at the end the unreliable


@pytest.mark.slow
def test_medl_lowers_its_loss_on_a_fixed_batch_and_both_networks_learn_from_the_fused_labels(planned, tmp_path):
    torch.manual_seed(0)
    trainer = make_trainer("MEDLTrainer", planned, tmp_path)
    assert set(trainer.members()) == {"unet", "vnet"} and set(trainer.extra_networks) == {"vnet"}
    trainer.epoch = 5
    terms = trainer.train_step(trainer.labeled_source[0], trainer.unlabeled_source[0])
    assert 0 < float(terms["fused_uncertainty"]) < 1
    terms["unlabeled"].backward()
    for model in trainer.members().values():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    losses, terms = fit_fixed_batch(trainer, 15)
    assert {"supervised", "evidential", "unlabeled", "fused_uncertainty"} <= set(terms)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_bad_medl_settings_get_clear_errors(planned, tmp_path):
    with pytest.raises(InputError, match="evidence 'relu' is unknown"):
        make_trainer("MEDLTrainer", planned, tmp_path, method={"evidence": "relu"})
    with pytest.raises(InputError, match="weight_unlabeled -1 is negative"):
        make_trainer("MEDLTrainer", planned, tmp_path, method={"weight_unlabeled": -1})
    with pytest.raises(InputError, match="rampup_fraction 0 is not positive"):
        make_trainer("MEDLTrainer", planned, tmp_path, method={"rampup_fraction": 0})
    with pytest.raises(InputError, match="not a multiple of 16"):
        make_trainer("MEDLTrainer", planned, tmp_path, patch_size=[8, 32, 32], method={"second_architecture": "vnet"})
    trainer = make_trainer("MEDLTrainer", planned, tmp_path, method={"preset": "paper", "evidence": "exp"})
    assert trainer.settings["evidence"] == "exp"
    assert torch.isfinite(trainer.train_step(trainer.labeled_source[0], trainer.unlabeled_source[0])["loss"])


@pytest.mark.slow
def test_medl_resumes_exactly_after_a_kill(planned, results, tmp_path):
    args = ["3d_fullres", "0", "--plans-root", str(planned), "-tr", "MEDLTrainer", "--epochs", "2",
            "--iterations-per-epoch", "3", *TINY, "--num-workers", "1", "--unlabeled-batch-size", "2"]
    uninterrupted, resumed = train_killed_and_resumed(args, "MEDLTrainer", results, tmp_path)
    assert_same_weights(uninterrupted, resumed, ("network", "networks"))
    assert uninterrupted["history"]["terms"][-1].keys() >= {"supervised", "evidential", "unlabeled"}
