"""The teacher-and-mixing toolkit and the copy-paste family (BCP, M3HL, CAD), pinned: masked
losses, pieces scored with their own dataset's prompt, pseudo-labels, masks, the EMA hook, stages,
feature taps, displacement, fitting a fixed batch, exact resume and clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from versemi.errors import InputError
from versemi.training.feature_taps import BackboneTap
from versemi.training.losses import SMOOTH, masked_dice_ce
from versemi.training.mixing import Regions, block_mask, box_mask
from versemi.training.pseudo_labels import confidence, hard_labels, largest_component
from versemi.training.teacher import EMATeacher
from versemi.training.trainers.cad import box_means, largest_low_confidence_box

from conftest import assert_same_weights, fit_fixed_batch, make_trainer, train_killed_and_resumed
from test_methods import TINY, logits_from

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILY = ["BCPTrainer", "M3HLTrainer", "CADTrainer"]


# ----- toolkit -----
def test_masked_dice_ce_counts_only_the_weighted_voxels():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 2, 4, 6, 6), (torch.rand(2, 1, 4, 6, 6) > 0.5).float()
    region = torch.zeros(2, 1, 4, 6, 6)
    region[..., :3] = 1
    prob = torch.softmax(logits, 1)[:, 1:2]
    dice = 1 - (2 * (region * prob * target).sum() + SMOOTH) / ((region * prob ** 2).sum() + (region * target).sum() + SMOOTH)
    ce = torch.nn.functional.cross_entropy(logits, target[:, 0].long(), reduction="none")[:, None]
    expected = dice + (ce * region).sum() / region.sum()
    assert torch.allclose(masked_dice_ce(logits, target, region), expected, atol=1e-6)
    changed = logits.clone()
    changed[..., 3:] = torch.randn_like(changed[..., 3:])  # outside the region: no effect
    assert torch.allclose(masked_dice_ce(changed, target, region), expected, atol=1e-6)
    assert float(masked_dice_ce(logits, target, torch.zeros_like(region))) == 0.0


def test_a_pasted_piece_is_scored_with_the_prompt_of_its_own_dataset():
    shape = (1, 1, 4, 6, 6)
    inside = torch.zeros(shape)
    inside[..., 1:3, 1:4, 1:4] = 1
    labeled = Regions.whole(torch.zeros(shape), torch.tensor([0]), torch.ones(shape))
    unlabeled = Regions.whole(torch.ones(shape), torch.tensor([2]), torch.zeros(shape), scale=0.5)
    pasted = labeled.paste(unlabeled, inside)
    assert pasted.prompts.tolist() == [[0, 2]] and pasted.scales == (1.0, 0.5)
    assert torch.equal(pasted.images, inside)
    assert torch.equal(pasted.masks[:, 0:1] + pasted.masks[:, 1:2], torch.ones(shape))  # the pieces tile the image
    # prompt 0 says "yes" outside the box (l's label), prompt 2 "no" inside it (u's target): ~ 0 loss
    right = torch.stack([logits_from(1 - inside)[:, 0], logits_from(torch.zeros(shape))[:, 0]], 1)
    assert float(pasted.loss(right)) < 1e-3
    other_inside = right.clone()
    other_inside[:, 0] = logits_from(torch.ones(shape))[:, 0]  # what prompt 0 says inside the box is not scored
    assert float(pasted.loss(other_inside)) < 1e-3
    wrong_outside = right.clone()
    wrong_outside[:, 0] = logits_from(torch.zeros(shape))[:, 0]  # prompt 0 says "no" outside, where l's label is 1
    assert float(pasted.loss(wrong_outside)) > 1.0
    wrong_prompt_2 = right.clone()
    wrong_prompt_2[:, 1] = logits_from(torch.ones(shape))[:, 0]  # prompt 2 says "yes" inside, where u's target is 0
    assert float(pasted.loss(wrong_prompt_2)) > 0.5 * 0.9  # the scale 0.5 times about one unit of Dice and CE


def test_same_prompt_paste_is_bcps_mixed_loss():
    torch.manual_seed(1)
    shape = (2, 1, 4, 8, 8)
    inside = box_mask(2, shape[2:], 0.5)
    a_target, b_target = (torch.rand(shape) > 0.5).float(), (torch.rand(shape) > 0.5).float()
    a = Regions.whole(torch.randn(shape), torch.tensor([1, 1]), a_target)
    b = Regions.whole(torch.randn(shape), torch.tensor([1, 1]), b_target, scale=0.5)
    logits = torch.randn(2, 2, *shape[2:])
    both = torch.stack([logits, logits], 1)  # the same prompt asked twice
    expected = masked_dice_ce(logits, a_target, 1 - inside) + 0.5 * masked_dice_ce(logits, b_target, inside)
    assert torch.allclose(a.paste(b, inside).loss(both), expected)


def test_block_mask_takes_the_ratio_of_blocks_per_sample():
    torch.manual_seed(0)
    mask = block_mask(3, (8, 8, 12), 4, 0.5)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask.mean((1, 2, 3, 4)).tolist() == [0.5, 0.5, 0.5]
    assert not torch.equal(mask[0], mask[1])
    blocks = mask[0, 0].reshape(4, 2, 4, 2, 4, 3)
    assert torch.equal(blocks.amin((1, 3, 5)), blocks.amax((1, 3, 5)))  # whole blocks only


def test_pseudo_label_helpers():
    probability = torch.zeros(1, 1, 6, 6, 6)
    probability[0, 0, :3, :3, :3] = 0.9  # 27 voxels
    probability[0, 0, 5, 5, 5] = 0.8    # 1 voxel, apart
    labels = hard_labels(probability)
    assert labels.sum() == 28
    kept = largest_component(labels)
    assert kept.sum() == 27 and kept[0, 0, 5, 5, 5] == 0
    assert largest_component(torch.zeros(2, 1, 3, 3, 3)).sum() == 0
    assert torch.allclose(confidence(torch.tensor([0.2, 0.5, 0.9])), torch.tensor([0.8, 0.5, 0.9]))


def test_ema_teacher_update_and_copy():
    student = torch.nn.Linear(3, 2)
    teacher = EMATeacher(student, 0.9)
    before = teacher.network.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    teacher.update(student)
    assert torch.allclose(teacher.network.weight, 0.9 * before + 0.1 * student.weight)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.network.training  # always in eval mode
    teacher.copy_from(student)
    assert torch.equal(teacher.network.weight, student.weight)
    with pytest.raises(ValueError, match="decay"):
        EMATeacher(student, 1.5)


def test_backbone_tap_records_the_features_of_each_forward(planned, tmp_path):
    trainer = make_trainer("SupervisedTrainer", planned, tmp_path)
    x = torch.randn(2, 1, 16, 32, 32)
    with BackboneTap(trainer.network) as tap:
        trainer.network(x, torch.tensor([0, 1]))
    assert len(tap.outputs) == 1 and tap.last.decoder.shape[:2] == (2, 4) and tap.last.bottleneck.shape[1] == 16
    trainer.network(x, torch.tensor([0, 1]))
    assert len(tap.outputs) == 1  # closed: nothing more recorded


# ----- the loop's hooks -----
def test_the_teacher_follows_the_student_after_each_optimizer_step(planned, tmp_path):
    trainer = make_trainer("MeanTeacherTrainer", planned, tmp_path)
    teacher_before = {k: v.clone() for k, v in trainer.teacher.network.state_dict().items()}
    trainer.optimize(0, trainer.labeled_source[0], trainer.unlabeled_source[0])
    student = trainer.model.state_dict()
    for key, value in trainer.teacher.network.state_dict().items():
        if value.dtype.is_floating_point:
            assert torch.allclose(value, 0.99 * teacher_before[key] + 0.01 * student[key], atol=1e-7), key


def test_bcp_teacher_starts_from_the_pretrained_student_and_moves_only_in_self_training(planned, tmp_path):
    trainer = make_trainer("BCPTrainer", planned, tmp_path, method={"pretrain_fraction": 0.5})  # stage 2 from epoch 5
    assert trainer.stage_starts() == [5] and trainer.unlabeled_from() == 5 * trainer.config.iterations_per_epoch
    initial = {k: v.clone() for k, v in trainer.teacher.network.state_dict().items()}
    trainer.optimize(0, trainer.labeled_source[0], None)  # stage 1: the teacher stays
    assert all(torch.equal(initial[k], v) for k, v in trainer.teacher.network.state_dict().items())
    trainer.epoch = 5
    trainer.on_stage_start(2)
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in trainer.teacher.network.state_dict().items())
    trainer.optimize(50, trainer.labeled_source[0], trainer.unlabeled_source[0])
    weight = next(k for k, v in initial.items() if v.dtype.is_floating_point and v.dim() > 1)
    assert not torch.equal(trainer.teacher.network.state_dict()[weight], trainer.model.state_dict()[weight])
    assert trainer.budget_phases() == [(0, 0.5), (5, 0.5)]


# ----- the family -----
@pytest.mark.parametrize("name", FAMILY)
def test_each_copy_paste_method_lowers_its_loss_on_a_fixed_batch(planned, tmp_path, name):
    torch.manual_seed(0)
    trainer = make_trainer(name, planned, tmp_path)
    trainer.epoch = 5  # self-training
    trainer.teacher.copy_from(trainer.model)
    losses, terms = fit_fixed_batch(trainer, 40)
    assert "copy_paste" in terms and all(torch.isfinite(v) for v in terms.values())
    if name == "M3HLTrainer":
        assert {"low_level", "high_level"} <= terms.keys()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_pretraining_pastes_labeled_pairs(planned, tmp_path):
    trainer = make_trainer("BCPTrainer", planned, tmp_path)
    losses, terms = fit_fixed_batch(trainer, 30)  # epoch 0: stage 1
    assert set(terms) == {"pretrain_mix", "loss"}
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_unlabeled_pieces_ask_the_teacher_and_the_student_with_their_own_datasets_prompt(planned, tmp_path):
    trainer = make_trainer("BCPTrainer", planned, tmp_path)
    trainer.epoch = 5
    labeled, unlabeled = trainer.labeled_source[0], trainer.unlabeled_source[0]
    unlabeled["dataset"] = torch.tensor([1, 1])  # both from DemoPancreas
    pancreas = {p["index"] for p in trainer.plans["prompts"] if p["dataset"] == trainer.plans["dataset_names"][1]}
    asked = []
    real_forward = trainer.network.forward
    trainer.network.forward = lambda x, prompts: asked.append(prompts.clone()) or real_forward(x, prompts)
    teacher_asked = []
    real_teacher = trainer.teacher.network.forward
    trainer.teacher.network.forward = lambda x, prompts: teacher_asked.append(prompts.clone()) or real_teacher(x, prompts)
    for _ in range(5):
        trainer.train_step(labeled, unlabeled)
    assert all(set(p.tolist()) <= pancreas for p in teacher_asked)
    for prompts in asked:  # rows: (l outside, u inside) then (u outside, l inside)
        assert prompts[0, 1].item() in pancreas and prompts[1, 0].item() in pancreas
        assert {prompts[0, 0].item(), prompts[1, 1].item()} <= set(labeled["prompt"].tolist())


@pytest.mark.parametrize("name", FAMILY)
def test_labeled_weight_adds_the_plain_supervised_loss_beside_the_mixed_images(planned, tmp_path, name):
    labeled_weight = 0.7
    plain = make_trainer(name, planned, tmp_path / "plain")
    plain.epoch = 5
    assert "supervised" not in plain.train_step(plain.labeled_source[0], plain.unlabeled_source[0])  # the paper's loss
    trainer = make_trainer(name, planned, tmp_path / "weighted", method={"labeled_weight": labeled_weight})
    trainer.epoch = 5
    labeled = trainer.labeled_source[0]
    terms = trainer.train_step(labeled, trainer.unlabeled_source[0])
    with torch.no_grad():
        expected = labeled_weight * trainer.supervised_terms(trainer.network, labeled)["supervised"]
    assert torch.allclose(terms["supervised"].detach(), expected, rtol=1e-4)
    assert torch.allclose(terms["loss"].detach(), sum(v.detach() for k, v in terms.items() if k != "loss"))


def test_m3hl_feature_terms_compare_each_mixed_image_with_its_own_unlabeled_image(planned, tmp_path):
    trainer = make_trainer("M3HLTrainer", planned, tmp_path)
    trainer.epoch = 5
    terms = trainer.train_step(trainer.labeled_source[0], trainer.unlabeled_source[0])
    student, teacher = trainer.student_features, trainer.teacher_features
    expected = torch.nn.functional.l1_loss(student.decoder[:2].float(), teacher.decoder[:2].float()) / 2
    assert torch.allclose(terms["low_level"], expected)
    terms["high_level"].backward()
    assert trainer.model.backbone.bottleneck.conv1.conv.weight.grad.abs().sum() > 0


def test_cad_box_search_helpers():
    torch.manual_seed(0)
    volume = torch.rand(5, 6, 7)
    means = box_means(volume, (2, 3, 4))
    assert means.shape == (4, 4, 4)
    assert torch.allclose(means[1, 2, 3], volume[1:3, 2:5, 3:7].mean().double())
    conf = np.ones((8, 8, 8))
    conf[1:4, 1:6, 2:4] = 0.6  # the largest low-confidence region
    conf[7, 7, 7] = 0.1
    assert largest_low_confidence_box(conf, 0.9, [8, 8, 8]) == ((1, 1, 2), (3, 5, 2))
    assert largest_low_confidence_box(conf, 0.9, [2, 2, 2]) == ((1, 2, 2), (2, 2, 2))  # cut around the centre
    assert largest_low_confidence_box(conf, 0.05, [8, 8, 8]) is None


def test_cad_moves_the_partners_confident_box_onto_the_largest_uncertain_region(planned, tmp_path):
    trainer = make_trainer("CADTrainer", planned, tmp_path)
    trainer.epoch = 10  # the end of self-training: threshold 0.95, boxes up to 0.25 of the patch
    assert trainer.schedule() == pytest.approx((0.95, 0.25))
    shape = (1, 1, 16, 32, 32)
    uncertain = torch.ones(shape)
    uncertain[..., 2:6, 4:12, 4:12] = 0.6
    source_confidence = torch.full(shape, 0.7)
    source_confidence[..., 10:14, 20:28, 20:28] = 1.0
    target = Regions.whole(torch.zeros(shape), torch.tensor([0]), torch.zeros(shape), confidence=uncertain)
    source = Regions.whole(torch.arange(np.prod(shape), dtype=torch.float).view(shape), torch.tensor([1]),
                           torch.ones(shape), scale=0.5, confidence=source_confidence)
    moved = trainer.displace(target, source)
    assert torch.equal(moved.images[..., 2:6, 4:12, 4:12], source.images[..., 10:14, 20:28, 20:28])
    assert moved.images[..., 6:, :, :].abs().sum() == 0  # nothing else replaced
    # the moved box weighs as many voxels as it holds (4 x 8 x 8 of 16 x 32 x 32), at its kind's weight
    assert moved.prompts.tolist() == [[0, 1]] and moved.scales == pytest.approx((1.0, 0.5 * 256 / 16384))
    assert torch.equal(moved.masks[:, 1:2], (moved.images != 0).float() + (moved.images == 0).float() * moved.masks[:, 1:2])
    trainer.settings["displaced_weight"] = "slot"  # a slot of its own at its kind's full weight
    assert trainer.displace(target, source).scales == (1.0, 0.5)


def test_bad_copy_paste_settings_get_clear_errors(planned, tmp_path):
    with pytest.raises(InputError, match="u_weight 2"):
        make_trainer("BCPTrainer", planned, tmp_path, method={"u_weight": 2})
    with pytest.raises(InputError, match="mask_ratio 1"):
        make_trainer("M3HLTrainer", planned, tmp_path, method={"mask_ratio": 1.0})
    with pytest.raises(InputError, match="threshold_end 0"):
        make_trainer("CADTrainer", planned, tmp_path, method={"threshold_end": 0.0})
    with pytest.raises(InputError, match="displaced_weight 'voxels'"):
        make_trainer("CADTrainer", planned, tmp_path, method={"displaced_weight": "voxels"})
    with pytest.raises(InputError, match="labeled_weight -1.0 is negative"):
        make_trainer("M3HLTrainer", planned, tmp_path, method={"labeled_weight": -1.0})
    with pytest.raises(InputError, match="at least 2 unlabeled"):
        make_trainer("BCPTrainer", planned, tmp_path, unlabeled_batch_size=1)
    with pytest.raises(InputError, match="at least 2 per process"):
        make_trainer("CADTrainer", planned, tmp_path, batch_size=1)
    with pytest.raises(InputError, match="known: .*box_ratio"):
        make_trainer("BCPTrainer", planned, tmp_path, method={"box_size": 0.5})


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY)
def test_copy_paste_methods_resume_exactly_after_a_kill(planned, results, tmp_path, name):
    # 3 epochs of 3 iterations, self-training from epoch 1: the kill (iteration 5) is in stage 2
    args = ["3d_fullres", "0", "--plans-root", str(planned), "-tr", name, "--epochs", "3",
            "--iterations-per-epoch", "3", *TINY, "--num-workers", "1", "--unlabeled-batch-size", "2",
            "--method", '{"pretrain_fraction": 0.34}']
    uninterrupted, resumed = train_killed_and_resumed(args, name, results, tmp_path)
    assert_same_weights(uninterrupted, resumed, ("network", "teacher"))
    assert uninterrupted["history"]["terms"][-1].keys() >= {"copy_paste", "loss"}
