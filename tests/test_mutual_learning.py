"""MutualLearningTrainer: two networks learn partial structures apart, then every structure from
each other; pseudo-labels only where an image's labels say nothing; one label map of every
structure from the pair; fitting a fixed batch, exact resume and clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from versemi.cli import predict_main
from versemi.datasets.io import read_image
from versemi.errors import InputError
from versemi.inference import load_models
from versemi.training.losses import prompt_columns
from versemi.training.trainers.mutual_learning import PEER, MutualLearningTrainer

from conftest import TOY_EXPERIMENT, assert_same_weights, make_trainer, train_killed_and_resumed
from test_methods import TINY

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "MutualLearningTrainer"


def _fit(trainer, steps: int) -> tuple[list[float], dict]:
    """``optimize`` (both networks step) ``steps`` times on the first batches (unlabeled ones from stage 2)."""
    labeled = trainer.labeled_source[0]
    unlabeled = trainer.unlabeled_source[0] if trainer.stage > 1 else None
    losses = []
    for _ in range(steps):
        terms = trainer.optimize(0, labeled, unlabeled)
        losses.append(terms["loss"])
    return losses, terms


@pytest.mark.slow
def test_mutual_learning_lowers_its_loss_in_both_stages(planned, tmp_path):
    torch.manual_seed(0)
    trainer = make_trainer(NAME, planned, tmp_path)
    assert trainer.stage_starts() == [3] and set(trainer.members()) == {"main", PEER}
    assert trainer.unlabeled_from() == 3 * trainer.config.iterations_per_epoch  # stage 1 learns from labels only
    losses, terms = _fit(trainer, 30)
    assert set(terms) == {"supervised", "exclusion", "feature_difference", "loss"}
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    trainer.epoch = 3
    trainer.on_stage_start(2)
    losses, terms = _fit(trainer, 30)
    assert set(terms) == {"supervised", "exclusion", "pseudo", "prediction_similarity", "feature_similarity", "loss"}
    assert all(np.isfinite(v) for v in terms.values())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_pseudo_labels_cover_only_what_an_images_labels_do_not_give(planned, tmp_path, monkeypatch):
    """Stage 2: a labeled image is pseudo-labeled for the other datasets' structures only, an
    unlabeled one for every structure; with threshold 0.5 every such voxel counts."""
    trainer = make_trainer(NAME, planned, tmp_path, method={"pseudo_threshold": 0.5})
    trainer.epoch = 3
    trainer.on_stage_start(2)
    seen = {}

    def capture(logits, targets, weight):
        seen["weight"] = weight
        return logits.sum() * 0

    monkeypatch.setattr(trainer, "_pseudo_loss", capture)
    labeled, unlabeled = trainer._to_device(trainer.labeled_source[0]), trainer._to_device(trainer.unlabeled_source[0])
    trainer.train_step(labeled, unlabeled)
    weight = seen["weight"].flatten(2).mean(2)  # (images, real prompts): the share of voxels pseudo-labeled
    n = labeled["data"].shape[0]
    own = trainer.dataset_prompts.own(labeled["dataset"])
    assert torch.equal(weight[:n], 1 - own) and torch.equal(weight[n:], torch.ones_like(weight[n:]))


def test_each_structures_pseudo_labels_count_by_the_frozen_pairs_dice_on_labeled_images(planned, tmp_path,
                                                                                        monkeypatch):
    trainer = make_trainer(NAME, planned, tmp_path, method={"pseudo_threshold": 0.5, "pseudo_reliability": True})
    prompts = len(trainer.dataset_prompts.indices)
    assert prompts == 2 and torch.equal(trainer.reliability(), torch.zeros(2))  # nothing measured yet: no weight
    frozen = torch.zeros(3, prompts, 1, 2, 2)  # (labeled images, prompts, z, y, x) frozen mean probabilities
    target = torch.zeros(3, 1, 1, 2, 2)
    frozen[0, 0, 0, 0, :] = 0.9                # image 0 (prompt 0): 2 voxels found, 1 of them true
    target[0, 0, 0, 0, 0] = target[0, 0, 0, 1, 1] = 1
    frozen[1, 1] = 0.2                         # image 1 (prompt 1): nothing found of its 4 true voxels ...
    target[1] = 1
    frozen[1, 0] = 0.9                         # ... while prompt 0, not its own, is ignored
    own = torch.tensor([0, 1, 0])              # image 2 (prompt 0): nothing true, nothing found
    trainer.measure_reliability(frozen, own, target)
    assert torch.allclose(trainer.reliability(), torch.tensor([2 * 1 / (2 + 2), 0.0]))
    frozen[1, 1] = 0.7                         # a second batch: prompt 1 now found exactly
    trainer.measure_reliability(frozen, own, target)
    assert torch.allclose(trainer.reliability(), torch.tensor([2 * 2 / (4 + 4), 2 * 4 / (4 + 8)]))
    assert torch.equal(trainer.extra_state()["frozen_pair_overlap"], trainer.overlap)

    # in a step: each prompt's pseudo-label weight is the reliability measured up to and with this batch
    trainer.epoch = 3
    trainer.on_stage_start(2)
    trainer.overlap.copy_(torch.tensor([[1.0, 3.0], [4.0, 4.0]]))  # measured before: Dice 0.25 and 0.75
    seen = {}
    monkeypatch.setattr(trainer, "_pseudo_loss", lambda logits, targets, weight: seen.setdefault("w", weight).sum() * 0)
    labeled, unlabeled = trainer._to_device(trainer.labeled_source[0]), trainer._to_device(trainer.unlabeled_source[0])
    terms = trainer.train_step(labeled, unlabeled)
    n = labeled["data"].shape[0]
    reliability = trainer.reliability()
    assert (reliability > 0).all()
    assert torch.allclose(seen["w"][n:].flatten(2).mean(2), reliability.expand(len(seen["w"]) - n, -1))
    assert float(terms["pseudo_reliability"]) == pytest.approx(float(reliability.mean()))
    assert float(terms["loss"].detach()) == pytest.approx(sum(float(v.detach()) for k, v in terms.items()
                                                     if k not in ("loss", "pseudo_reliability")), rel=1e-5)


def test_other_datasets_structures_are_scored_absent_where_own_labels_hold():
    probability = torch.zeros(2, 2, 1, 2, 2)  # (images, prompts, z, y, x)
    probability[0, 1, 0, 0, 0] = 0.8          # image 0 claims prompt 1 on its own structure's voxel
    probability[0, 1, 0, 1, 1] = 0.9          # ... and off it (not scored: nothing is known there)
    where = torch.zeros(2, 1, 1, 2, 2, dtype=torch.bool)
    where[0, 0, 0, 0, 0] = where[1, 0, 0, 0, 0] = True
    other = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # image 0 lacks prompt 1, image 1 lacks prompt 0
    assert MutualLearningTrainer._absent(probability, where, other).item() == pytest.approx(0.8 / 2)


def test_the_worse_network_takes_the_better_ones_features(planned, tmp_path):
    only_transfer = {"exclusion_weight": 0.0, "pseudo_weight": 0.0, "prediction_similarity_weight": 0.0,
                     "feature_similarity_weight": 1.0}
    trainer = make_trainer(NAME, planned, tmp_path, method=only_transfer)
    trainer.epoch = 3
    trainer.on_stage_start(2)
    labeled, unlabeled = trainer._to_device(trainer.labeled_source[0]), trainer._to_device(trainer.unlabeled_source[0])
    torch.manual_seed(0)
    terms = trainer.train_step(labeled, unlabeled)
    terms["feature_similarity"].backward()
    moved = {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
             for name, model in trainer.members().items()}
    assert sorted(moved.values()) == [False, True]  # exactly one network learns from the other
    real = trainer.dataset_prompts.indices
    column = (labeled["prompt"][:, None] == real[None]).float().argmax(1)
    with torch.no_grad():
        supervised = {name: float(trainer.loss(prompt_columns(
            model(torch.cat([labeled["data"], unlabeled["data"]]), real.expand(4, -1)), column), labeled["target"]))
            for name, model in trainer.members().items()}
    learner = next(name for name, flag in moved.items() if flag)
    assert supervised[learner] >= max(supervised.values())


def test_bad_mutual_learning_settings_get_clear_errors(planned, tmp_path):
    with pytest.raises(InputError, match="stage1_fraction = 1"):
        make_trainer(NAME, planned, tmp_path, method={"stage1_fraction": 1.0})
    with pytest.raises(InputError, match="pseudo_threshold = 0.3"):
        make_trainer(NAME, planned, tmp_path, method={"pseudo_threshold": 0.3})
    with pytest.raises(InputError, match="pseudo_weight must not be negative"):
        make_trainer(NAME, planned, tmp_path, method={"pseudo_weight": -1.0})


@pytest.mark.slow
def test_mutual_learning_resumes_exactly_and_predicts_every_structure_as_one_label_map(planned, results, tmp_path,
                                                                                         toy_raw_master):
    # 3 epochs of 3 iterations, stage 2 from epoch 1: the kill (iteration 5) is in stage 2
    args = ["3d_fullres", "0", "--plans-root", str(planned), "-tr", NAME, "--epochs", "3",
            "--iterations-per-epoch", "3", *TINY, "--num-workers", "1", "--unlabeled-batch-size", "2",
            "--method", '{"stage1_fraction": 0.34}']
    uninterrupted, resumed = train_killed_and_resumed(args, NAME, results, tmp_path)
    assert_same_weights(uninterrupted, resumed, ("network", "networks", "stage1_main", "stage1_peer"))
    assert uninterrupted["history"]["terms"][-1].keys() >= {"pseudo", "prediction_similarity", "loss"}
    # the pair predicts every structure of both datasets into one label map
    ensemble = load_models(results / TOY_EXPERIMENT, ["0"], NAME)
    assert ensemble.members == ["main", PEER]
    image = sorted((toy_raw_master / "DemoLA" / "imagesTs").glob("*_0000.nii.gz"))[0]
    assert predict_main(["-e", TOY_EXPERIMENT, "-tr", NAME, "-f", "0", "-i", str(image), "-o", str(tmp_path / "out"),
                         "--plans-root", str(planned), "--no-mirroring", "--quiet"]) == 0
    labels = read_image([tmp_path / "out" / image.name.replace("_0000", "")])[0]
    assert set(np.unique(labels)) <= {0, 1, 2} and (tmp_path / "out" / "labels.json").is_file()
