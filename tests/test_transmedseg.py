"""TransMedSeg: the semantic augmentation bound against its definition, the memory module's
update, the head tap, the trainer lowering its loss in 3d and 2d, and an exact resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from versemi.errors import InputError
from versemi.training.semantic_augmentation import (FeatureMemory, augmented_logits, class_statistics,
                                                    masked_cross_entropy)

from conftest import assert_same_weights, fit_fixed_batch, make_trainer, train_killed_and_resumed
from test_2d import planned_2d, resume_args_2d  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_bound_follows_its_definition_and_bounds_the_expected_cross_entropy():
    """Per voxel: the other class's logit gains lambda (w_j - w_y) . shift_y + lambda/2 (w_j - w_y)^T
    Sigma_y (w_j - w_y); its cross-entropy lies above the mean over sampled augmented features."""
    torch.manual_seed(0)
    features, strength = 4, 0.7
    w = torch.randn(1, 1, 2, features)
    bias = torch.randn(2)
    f = torch.randn(1, 1, features, 5)  # five voxels
    labels = torch.tensor([[[0, 1, 1, 0, 1]]]).float()
    shift = torch.randn(1, 2, features)
    root = torch.randn(1, 2, features, features)
    covariance = root @ root.transpose(-1, -2) / features
    logits = (torch.einsum("bkcf,bkfv->bkcv", w, f) + bias[:, None]).float()  # (1, 1, 2, V)
    out = augmented_logits(logits, w[:, :, 1] - w[:, :, 0], labels, shift, covariance, strength)
    for v in range(5):
        y = int(labels[0, 0, v])
        d = w[0, 0, 1 - y] - w[0, 0, y]
        gain = strength * d @ shift[0, y] + strength / 2 * d @ covariance[0, y] @ d
        assert out[0, 0, 1 - y, v] == pytest.approx(float(logits[0, 0, 1 - y, v] + gain), abs=1e-5)
        assert out[0, 0, y, v] == pytest.approx(float(logits[0, 0, y, v]), abs=1e-6)
        # Monte Carlo: features drawn from N(f + lambda shift_y, lambda Sigma_y), classified by w
        draws = torch.distributions.MultivariateNormal(f[0, 0, :, v] + strength * shift[0, y],
                                                       strength * covariance[0, y] + 1e-6 * torch.eye(features))
        sampled = draws.sample((20000,)) @ w[0, 0].T + bias
        expected = F.cross_entropy(sampled, torch.full((20000,), y)).item()
        bound = F.cross_entropy(out[0, 0, :, v][None], torch.tensor([y])).item()
        assert expected <= bound + 0.01
    # lambda 0: the plain logits
    assert torch.equal(augmented_logits(logits, w[:, :, 1] - w[:, :, 0], labels, shift, covariance, 0.0), logits)


def test_class_statistics_and_the_memory_update():
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(2, 1, 3, 40))).float()  # (B, K, F, V)
    labels = torch.from_numpy(rng.integers(0, 2, size=(2, 1, 40))).float()
    weights = torch.ones(2, 1, 40)
    weights[1, 0, :10] = 0  # left out
    count, mean, covariance = class_statistics(features, labels, weights)
    for c in (0, 1):
        chosen = np.concatenate([features[b, 0].numpy()[:, (labels[b, 0].numpy() == c) & (weights[b, 0].numpy() > 0)]
                                 for b in range(2)], axis=1)
        assert count[0, c] == chosen.shape[1]
        np.testing.assert_allclose(mean[0, c].numpy(), chosen.mean(1), atol=1e-5)
        np.testing.assert_allclose(covariance[0, c].numpy(), np.cov(chosen, bias=True), atol=1e-5)

    memory = FeatureMemory(1, 3, momentum=0.25, min_voxels=5)
    memory.update(features, labels, weights)  # the first batch sets the memory
    assert torch.allclose(memory.mean, mean) and torch.allclose(memory.covariance, covariance)
    assert memory.seen.all()
    shifted = features + 2.0
    memory.update(shifted, labels, weights)  # then each batch moves it by the momentum
    assert torch.allclose(memory.mean, mean + 0.25 * 2.0, atol=1e-5)
    assert torch.allclose(memory.covariance, covariance, atol=1e-4)
    only_background = torch.zeros_like(labels)
    only_background[0, 0, :3] = 1  # three foreground voxels: fewer than min_voxels
    before = memory.mean[0, 1].clone()
    memory.update(features, only_background, weights)
    assert torch.equal(memory.mean[0, 1], before)
    fresh = FeatureMemory(1, 3, momentum=0.25)
    fresh.load_state_dict(memory.state_dict())
    assert torch.equal(fresh.mean, memory.mean) and torch.equal(fresh.seen, memory.seen)


def test_masked_cross_entropy_counts_only_weighted_voxels():
    logits = torch.zeros(1, 1, 2, 4)
    logits[0, 0, 1, :2] = 5.0
    labels = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    full = masked_cross_entropy(logits, labels, torch.ones(1, 1, 4))
    first_two = masked_cross_entropy(logits, labels, torch.tensor([[[1.0, 1.0, 0.0, 0.0]]]))
    assert first_two < full and first_two == pytest.approx(F.cross_entropy(torch.tensor([[0.0, 5.0]]), torch.tensor([1])).item())


def _trainer(planned, tmp_path, **method):
    return make_trainer("TransMedSegTrainer", planned, tmp_path, method={"rampup_fraction": 0.0, **method})


def test_the_head_tap_gives_the_features_the_last_layer_classifies(planned, tmp_path):
    from versemi.nets.prompt_head import split_head_params
    from versemi.training.feature_taps import HeadTap
    from versemi.training.trainers.transmedseg import hidden_features

    trainer = _trainer(planned, tmp_path)
    trainer.network.eval()
    x = trainer.unlabeled_source[0]["data"]
    prompts = trainer.every_real_prompt(x.shape[0])
    with torch.no_grad(), HeadTap(trainer.network) as tap:
        logits = trainer.network(x, prompts)
        hidden = hidden_features(tap)
        w3, b3 = split_head_params(tap.head.head_params(*tap.last))[-1]
    again = (torch.matmul(w3, hidden) + b3[..., None]).view_as(logits)
    assert torch.allclose(again, logits, atol=1e-4)


@pytest.mark.parametrize("lambda0", [0.0, 0.25])
def test_the_step_lowers_its_loss_on_a_fixed_batch_and_fills_the_memory(planned, tmp_path, lambda0):
    torch.manual_seed(0)
    trainer = _trainer(planned, tmp_path, lambda0=lambda0)
    trainer.epoch = trainer.method_epochs // 2  # lambda half way
    before = {k: v.clone() for k, v in trainer.teacher.network.state_dict().items()}
    losses, terms = fit_fixed_batch(trainer, 12)
    assert set(terms) == {"supervised", "transferable_ce", "loss"}
    assert losses[-1] < 0.8 * losses[0], losses
    assert trainer.memories["teacher"].seen.any() and trainer.memories["student"].seen.any()
    assert all(torch.equal(before[k], v) for k, v in trainer.teacher.network.state_dict().items())


def test_the_augmentation_raises_the_unlabeled_term(planned, tmp_path):
    """No optimizer step is taken, so the teacher is still the student's copy: on a clean student
    view the two memories hold the same means, the shift is about 0 and the covariance term, which
    only ever raises the wrong class's logit, decides: a larger lambda gives a larger bound."""
    torch.manual_seed(0)
    trainer = _trainer(planned, tmp_path, lambda0=1.0, student_noise=0.0, student_contrast=0.0)
    labeled, unlabeled = trainer.labeled_source[0], trainer.unlabeled_source[0]
    trainer.train_step(labeled, unlabeled)  # fills the memory
    values = []
    for epoch in (0, trainer.method_epochs):  # lambda 0, then lambda0
        trainer.epoch = epoch
        torch.manual_seed(1)
        values.append(float(trainer.train_step(labeled, unlabeled)["transferable_ce"].detach()))
    assert values[1] > values[0], values


def test_the_2d_configuration_trains(planned_2d, tmp_path):  # noqa: F811
    import json

    from conftest import TOY_EXPERIMENT

    torch.manual_seed(0)
    plans = json.loads((planned_2d / TOY_EXPERIMENT / "plans.json").read_text(encoding="utf-8"))
    trainer = make_trainer("TransMedSegTrainer", planned_2d, tmp_path, plans=plans, configuration="2d",
                           patch_size=None, batch_size=6, features=[4, 8, 16], method={"rampup_fraction": 0.0})
    losses, terms = fit_fixed_batch(trainer, 12)
    assert float(terms["transferable_ce"].detach()) > 0
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("setting,value", [("lambda0", -0.1), ("memory_momentum", 0.0), ("memory_momentum", 1.5),
                                           ("teacher_mirroring", True)])
def test_out_of_range_settings_are_refused(planned, tmp_path, setting, value):
    with pytest.raises(InputError, match=setting):
        _trainer(planned, tmp_path, **{setting: value})


@pytest.mark.slow
def test_transmedseg_resumes_exactly_after_a_kill(planned_2d, results, tmp_path):  # noqa: F811
    args = resume_args_2d(planned_2d, "TransMedSegTrainer", "--supervised-warm-up", "0")
    uninterrupted, resumed = train_killed_and_resumed(args, "TransMedSegTrainer", results, tmp_path)
    assert_same_weights(uninterrupted, resumed, ("network", "teacher", "memory_student", "memory_teacher"))
    assert uninterrupted["history"]["terms"][-1].keys() >= {"supervised", "transferable_ce"}
