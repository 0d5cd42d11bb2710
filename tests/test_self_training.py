"""SelfTrainingTrainer: the EMA teacher's hard pseudo-labels, counted only for the sample's own
dataset and confident voxels, against a perturbed student view; labeled images stay clean."""
from __future__ import annotations

import pytest
import torch

from versemi.errors import InputError

from conftest import fit_fixed_batch, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def trainer_with(planned, tmp_path, **method):
    return make_trainer("SelfTrainingTrainer", planned, tmp_path, method=method)


def test_pseudo_labels_count_only_own_dataset_prompts_and_confident_voxels(planned, tmp_path):
    trainer = trainer_with(planned, tmp_path)
    unlabeled = trainer.unlabeled_source[0]
    labels, weights = trainer.pseudo_labels(unlabeled)
    own = trainer.dataset_prompts.own(unlabeled["dataset"])
    assert labels.shape == weights.shape and labels.shape[:2] == own.shape
    assert set(labels.unique().tolist()) <= {0.0, 1.0}
    # threshold 0: every voxel of an own prompt, none of another dataset's
    assert torch.equal(weights.flatten(2).amin(2), own) and torch.equal(weights.flatten(2).amax(2), own)
    assert 0 < own.sum() < own.numel()  # the demo pair: each sample has prompts of its own and not
    strict = trainer_with(planned, tmp_path / "strict", confidence_threshold=0.9)
    strict.teacher.network.load_state_dict(trainer.teacher.network.state_dict())
    _, strict_weights = strict.pseudo_labels(unlabeled)
    assert (strict_weights <= weights).all() and strict_weights.sum() < weights.sum()


def test_a_mirrored_teacher_is_flip_equivariant(planned, tmp_path):
    torch.manual_seed(0)
    x = trainer_with(planned, tmp_path / "data").unlabeled_source[0]["data"]

    def probabilities(trainer, images):
        passes = []
        forward = trainer.teacher.network.forward
        trainer.teacher.network.forward = lambda x, prompts: passes.append(x) or forward(x, prompts)
        return trainer.teacher_probability(images), len(passes)

    mirrored = trainer_with(planned, tmp_path / "mirrored", teacher_mirroring=True)
    probability, passes = probabilities(mirrored, x)
    of_flipped, _ = probabilities(mirrored, x.flip(4))
    assert passes == 8 and torch.allclose(of_flipped, probability.flip(4), atol=1e-6)  # the mean over every flip
    plain = trainer_with(planned, tmp_path / "plain")
    plain.teacher.network.load_state_dict(mirrored.teacher.network.state_dict())
    probability, passes = probabilities(plain, x)
    of_flipped, _ = probabilities(plain, x.flip(4))
    assert passes == 1 and (of_flipped - probability.flip(4)).abs().max() > 1e-4


def test_student_view_is_perturbed_and_the_zero_setting_keeps_the_image(planned, tmp_path):
    images = torch.randn(2, 1, 4, 8, 8)
    assert not torch.allclose(trainer_with(planned, tmp_path).student_view(images), images)
    plain = trainer_with(planned, tmp_path / "plain", student_noise=0.0, student_contrast=0.0)
    assert torch.equal(plain.student_view(images), images)


@pytest.mark.parametrize("cutmix", [False, True])
def test_step_trains_the_student_only_and_reduces_the_loss(planned, tmp_path, cutmix):
    torch.manual_seed(0)
    trainer = trainer_with(planned, tmp_path, unlabeled_cutmix=cutmix, rampup_fraction=0.0)
    before = {k: v.clone() for k, v in trainer.teacher.network.state_dict().items()}
    losses, terms = fit_fixed_batch(trainer, 12)
    assert set(terms) == {"supervised", "pseudo_label", "loss"}
    assert float(terms["pseudo_label"].detach()) > 0
    assert losses[-1] < 0.8 * losses[0], losses
    # the teacher only moves in the loop's after-step hook, never through the loss
    assert all(torch.equal(before[k], v) for k, v in trainer.teacher.network.state_dict().items())


@pytest.mark.parametrize("setting,value", [("confidence_threshold", 1.5), ("ema_decay", -0.1),
                                           ("student_noise", -1.0)])
def test_out_of_range_settings_are_refused(planned, tmp_path, setting, value):
    with pytest.raises(InputError, match=setting):
        trainer_with(planned, tmp_path, **{setting: value})
