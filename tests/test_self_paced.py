"""Self-paced contrastive learning with meta-labels: the meta-labels the pipeline derives, the
self-paced loss, both stages lowering their loss, the pre-training reused, an exact resume."""
from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from versemi.datasets.io import Geometry, write_image
from versemi.datasets.layout import write_dataset_json
from versemi.training.contrastive import position_bands, same_label, self_paced_contrast, self_paced_gamma

from conftest import TOY_EXPERIMENT, assert_same_weights, fit_fixed_batch, make_trainer, train_killed_and_resumed
from test_2d import TINY_2D, planned_2d, resume_args_2d  # noqa: F401  (the fixture)


def test_meta_labels_on_a_hand_made_volume(tmp_path):
    """Slices whose intensity is their index + 1: each 2d patch tells where it came from."""
    from versemi.plans.experiment import ExperimentRequest, plan_and_preprocess
    from versemi.training.data import BatchSource, CaseStore, StreamSettings
    from versemi.model.augmentation_settings import AugmentationSettings

    folder, slices = tmp_path / "raw" / "Ramp", 9
    geometry = Geometry((1.0, 1.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ramp = np.broadcast_to(np.arange(1, slices + 1, dtype=np.float32)[:, None, None], (slices, 12, 14)).copy()
    for case in range(2):
        write_image(ramp, geometry, folder / "imagesTr" / f"r{case}_0000.nii.gz")
        write_image((ramp > 4).astype(np.uint8), geometry, folder / "labelsTr" / f"r{case}.nii.gz")
    write_dataset_json(folder, ("MRI",), {"background": 0, "band": 1}, 2, ".nii.gz")
    plan_and_preprocess(ExperimentRequest(["Ramp"], tmp_path / "raw", tmp_path / "plans", num_processes=1,
                                          show_progress=False, configurations=["2d"]))
    plans = json.loads((tmp_path / "plans" / "Ramp" / "plans.json").read_text(encoding="utf-8"))
    keys = ["Ramp/r0", "Ramp/r1"]
    store = CaseStore(plans, tmp_path / "plans", "2d", keys)
    source = BatchSource(store, keys, plans, StreamSettings(6, [1, 8, 8], True, 0.33, AugmentationSettings(enabled=False),
                                                            spatial_dims=2), seed=0, stream="labeled")
    mean, std = (slices + 1) / 2, math.sqrt((slices ** 2 - 1) / 12)  # the z-score of 1 .. slices
    seen = set()
    for iteration in range(4):
        batch = source[iteration]
        index = batch["data"][:, 0, 0, 4, 4] * std + mean - 1  # the slice each patch was cut from
        assert torch.allclose(batch["position"], index / (slices - 1), atol=1e-4)
        assert batch["scan"].tolist() == [zlib.crc32(k.encode()) for k in batch["keys"]]
        seen |= set(batch["scan"].tolist())
    assert len(seen) == 2
    assert position_bands(torch.tensor([0.0, 0.24, 0.25, 0.99, 1.0]), 4).tolist() == [0, 0, 1, 3, 3]


def test_the_self_paced_loss():
    torch.manual_seed(0)
    first = F.normalize(torch.randn(6, 16), dim=1)
    positives = same_label(torch.tensor([0, 0, 1, 1, 2, 2]))
    aligned, kept = self_paced_contrast(first, first, positives, 0.5)
    random, _ = self_paced_contrast(first, F.normalize(torch.randn(6, 16), dim=1), positives, 0.5)
    assert kept == 1.0 and aligned < random
    # with a small gamma only the easy positive pairs count; with a huge one all of them
    _, few = self_paced_contrast(first, first, positives, 0.5, gamma=1.5, mode="hard")
    _, soft = self_paced_contrast(first, first, positives, 0.5, gamma=1.5, mode="soft")
    _, every = self_paced_contrast(first, first, positives, 0.5, gamma=1e6, mode="hard")
    assert 0 < few < 1 and 0 < soft < 1 and every == 1.0
    assert self_paced_gamma(0.0, 2, 20) == 2 and self_paced_gamma(1.0, 2, 20) == 20
    assert self_paced_gamma(0.25, 2, 20) == pytest.approx(11.0)  # (t/T)^0.5


def _trainer(planned_2d, tmp_path, **method):  # noqa: F811
    plans = json.loads((planned_2d / TOY_EXPERIMENT / "plans.json").read_text(encoding="utf-8"))
    return make_trainer("SelfPacedContrastiveTrainer", planned_2d, tmp_path, plans=plans, configuration="2d",
                        patch_size=None, batch_size=6, features=[4, 8, 16], method=method)


def test_each_stage_lowers_its_loss_on_a_fixed_batch(planned_2d, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    trainer = _trainer(planned_2d, tmp_path, gamma_begin=1e6, gamma_end=1e6)
    assert trainer.stage == 1 and trainer.config.supervised_warm_up == "0"
    losses, terms = fit_fixed_batch(trainer, 25)
    assert set(terms) == {"contrast", "self_paced_kept", "loss"}
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses
    trainer.epoch = trainer.pretrain_epochs()
    assert trainer.stage == 2
    losses, terms = fit_fixed_batch(trainer, 25)
    assert set(terms) == {"supervised", "contrast", "self_paced_kept", "loss"}
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_bad_meta_labels_are_refused(planned_2d, tmp_path):  # noqa: F811
    from versemi.errors import InputError

    with pytest.raises(InputError, match="meta_labels"):
        _trainer(planned_2d, tmp_path, meta_labels=["phase"])


def test_the_pretraining_runs_alone_and_is_reused(planned_2d, results, tmp_path, monkeypatch, one_thread):  # noqa: F811
    from versemi.cli import train_main

    monkeypatch.setenv("VERSEMI_PLANS", str(planned_2d))
    tiny = [a for a in TINY_2D if a != "--quiet"]
    assert train_main(["2d", "0", "-tr", "SelfPacedContrastiveTrainer", *tiny, "--method",
                       '{"pretrain_fraction": 1.0}']) == 0
    pretrained = results / TOY_EXPERIMENT / "SelfPacedContrastiveTrainer__2d" / "fold_0" / "checkpoint_final.pth"
    state = torch.load(pretrained, weights_only=False)
    assert state["history"]["terms"][-1].keys() >= {"contrast"} and "supervised" not in state["history"]["terms"][-1]
    monkeypatch.setenv("VERSEMI_RESULTS", str(tmp_path / "finetuned"))
    assert train_main(["2d", "0", "-tr", "SelfPacedContrastiveTrainer", *tiny, "--init-from", str(pretrained)]) == 0
    log = (tmp_path / "finetuned" / TOY_EXPERIMENT / "SelfPacedContrastiveTrainer__2d" / "fold_0" /
           "training_log.txt").read_text(encoding="utf-8")
    assert "stage 1 skipped (pretrain_fraction 0)" in log


@pytest.mark.slow
def test_self_paced_contrastive_resumes_exactly_after_a_kill(planned_2d, results, tmp_path, one_thread):  # noqa: F811
    args = resume_args_2d(planned_2d, "SelfPacedContrastiveTrainer", "--method", '{"pretrain_fraction": 0.34}')
    uninterrupted, resumed = train_killed_and_resumed(args, "SelfPacedContrastiveTrainer", results, tmp_path)
    assert_same_weights(uninterrupted, resumed, ("network", "networks"))
    assert uninterrupted["history"]["terms"][-1].keys() >= {"supervised", "contrast"}
