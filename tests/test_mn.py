"""M&N: a 2d network run slice by slice beside the 3d one, masks exchanged voxel for voxel, the
learning-rate-guided share of unlabeled rows, user-supplied 2d weights, an exact resume."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn

from versemi.training.slices import through_slices

from conftest import assert_same_weights, fit_fixed_batch, make_trainer, train_killed_and_resumed
from test_multi_network_methods import TINY


class SliceEcho(nn.Module):
    """A stand-in 2d network: logits (-x, x) of its one-slice input, plus the prompt."""

    def forward(self, rows, prompts):
        assert rows.shape[2] == 1
        x = rows[:, :1] + prompts.view(-1, 1, 1, 1, 1)
        return torch.cat([-x, x], dim=1)


def test_slices_go_through_the_2d_network_and_come_back_in_place():
    torch.manual_seed(0)
    volumes = torch.randn(2, 1, 5, 12, 18)
    prompts = torch.tensor([3, 7])
    logits = through_slices(SliceEcho(), volumes, prompts, (1, 8, 8))  # padded to 16 x 24, cropped back
    expected = volumes + prompts.view(-1, 1, 1, 1, 1)
    assert logits.shape == (2, 2, 5, 12, 18)
    assert torch.equal(logits[:, 1:], expected) and torch.equal(logits[:, :1], -expected)


def test_a_real_2d_network_over_slices_equals_slice_by_slice(planned):
    from versemi.nets import build_network
    from versemi.plans.topology import pool_and_conv_props

    plan = {**pool_and_conv_props([1.0, 1.0], [16, 16]).lifted().network_plan(), "features": [4, 8, 16]}
    plan["strides"], plan["kernel_sizes"] = plan["strides"][:3], plan["kernel_sizes"][:3]
    torch.manual_seed(0)
    network = build_network(plan, 1, 3).eval()
    volumes = torch.randn(2, 1, 3, 16, 16)
    with torch.no_grad():
        together = through_slices(network, volumes, torch.tensor([0, 1]), network.divisor)
        for b in range(2):
            for z in range(3):
                alone = network(volumes[b:b + 1, :, z:z + 1], torch.tensor([b]))[0, :, 0]
                assert torch.allclose(together[b, :, z], alone, atol=1e-5)


def _trainer(planned, tmp_path, **method):
    return make_trainer("MNTrainer", planned, tmp_path, method=method, unlabeled_batch_size=2)


def test_each_stage_lowers_its_loss_on_a_fixed_batch(planned, tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(planned, tmp_path, transition_fraction=0.5)
    assert trainer.stage == 1 and trainer.extra_networks["network_2d"].network_plan is None  # training only
    losses, terms = fit_fixed_batch(trainer, 20)
    assert set(terms) == {"network_3d", "network_2d", "loss"}
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    trainer.epoch = 9  # late in stage 2: most of the batch comes from the unlabeled stream
    assert trainer.stage == 2 and trainer.pseudo_rows(2) == 1
    losses, terms = fit_fixed_batch(trainer, 20)
    assert terms["pseudo_rows"] == 1 and np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    assert list(trainer.members()) == [trainer.network_name]  # prediction: the 3d network alone


def test_the_unlabeled_share_follows_the_learning_rate(planned, tmp_path):
    trainer = _trainer(planned, tmp_path, transition_fraction=0.3)
    start = trainer.warm_up_epochs + trainer.transition_epochs()
    shares = []
    for epoch in range(trainer.config.epochs):
        trainer.epoch = epoch
        shares.append(trainer.learning_rate_share(start))
    assert shares[:start + 1] == [0.0] * (start + 1)
    assert all(b > a for a, b in zip(shares[start:], shares[start + 1:])) and shares[-1] < 1
    trainer.epoch = trainer.config.epochs - 1
    assert trainer.pseudo_rows(8) == int(shares[-1] * 8) and trainer.pseudo_rows(2) == 1


def test_user_supplied_2d_weights_are_loaded_or_refused(planned, tmp_path):
    from versemi.errors import InputError

    source = _trainer(planned, tmp_path / "a")
    weights = {k: v + 0.5 for k, v in source.extra_networks["network_2d"].model.state_dict().items()}
    torch.save(weights, tmp_path / "mine.pt")
    loaded = _trainer(planned, tmp_path / "b", pretrained_2d=str(tmp_path / "mine.pt"))
    for key, value in loaded.extra_networks["network_2d"].model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    torch.save({"just": "a dict"}, tmp_path / "junk.pt")
    (tmp_path / "text.pt").write_text("not weights", encoding="utf-8")
    torch.save({k: v[..., :1] if v.dim() > 1 else v for k, v in weights.items()}, tmp_path / "small.pt")
    for name, message in (("junk.pt", "no state dict"), ("text.pt", "not a PyTorch file"),
                          ("small.pt", "does not fit the 2d network"), ("absent.pt", "does not exist")):
        with pytest.raises(InputError, match=message) as raised:
            _trainer(planned, tmp_path / f"run_{name}", pretrained_2d=str(tmp_path / name))
        assert "state dict of this experiment's 2d network" in str(raised.value)


def test_the_2d_network_starts_from_the_experiments_own_2d_run_where_it_has_finished(planned, tmp_path):
    from versemi.model.plans_view import PlansView
    from test_warm_start import saved_checkpoint

    experiment = tmp_path / "results" / "Toy"
    source_3d = saved_checkpoint("SupervisedTrainer", planned, tmp_path / "source")

    def mn(name, **config):
        return make_trainer("MNTrainer", planned, tmp_path, output=experiment / "MNTrainer__3d_fullres" / name,
                            unlabeled_batch_size=2, **config)

    alone = mn("fold_a")  # no 2d run yet: random weights, and the log says how to get one
    assert alone.settings["pretrained_2d"] == "" == alone.config.method["pretrained_2d"]
    log = (experiment / "MNTrainer__3d_fullres" / "fold_a" / "training_log.txt").read_text(encoding="utf-8")
    assert "starts from random weights" in log and "versemi_train 2d 0 -tr SupervisedTrainer" in log
    warm = mn("fold_b", init_from=str(source_3d))  # the 3d network warm, the 2d one not: stage 1 trains it
    assert warm.stage == 1 and warm.settings["transition_fraction"] == 0.3
    assert warm.warm_start["left_as_initialised"] == ["network_2d"] and warm.warm_start["skipped_stage"] is None

    own = experiment / "SupervisedTrainer__2d" / "fold_c" / "checkpoint_final.pth"
    own.parent.mkdir(parents=True)
    weights = {k: v + 0.25 for k, v in alone.extra_networks["network_2d"].model.state_dict().items()}
    torch.save({"configuration": "2d", "network_plan": alone.default_2d_plan(PlansView(alone.plans)),
                "network": weights}, own)
    found = mn("fold_c", init_from=str(source_3d))
    for key, value in found.extra_networks["network_2d"].model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert found.settings["pretrained_2d"] == str(own) == found.config.method["pretrained_2d"]  # kept for --continue
    assert found.stage == 2 and found.warm_start["skipped_stage"] == "transition_fraction"  # both networks given
    (experiment / "SupervisedTrainer__2d" / "fold_d").mkdir()
    shutil.copy(own, experiment / "SupervisedTrainer__2d" / "fold_d" / own.name)
    random_2d = mn("fold_d", method={"pretrained_2d": ""})  # "": random weights even beside a 2d run
    assert random_2d.settings["pretrained_2d"] == ""
    assert not torch.equal(random_2d.extra_networks["network_2d"].model.state_dict()[key], weights[key])


def test_pretrained_2d_is_refused_for_a_trainer_without_a_2d_network(planned, results, monkeypatch, capsys, tmp_path):
    from versemi.cli import train_main

    monkeypatch.setenv("VERSEMI_PLANS", str(planned))
    torch.save({}, tmp_path / "w.pt")
    assert train_main(["3d_fullres", "0", "-tr", "SupervisedTrainer", "--pretrained-2d", str(tmp_path / "w.pt"),
                       *TINY]) != 0
    assert "trains no 2d network" in capsys.readouterr().err


@pytest.mark.slow
def test_mn_resumes_exactly_after_a_kill(planned, results, tmp_path, one_thread):
    args = ["3d_fullres", "0", "--plans-root", str(planned), "-tr", "MNTrainer", "--epochs", "3",
            "--iterations-per-epoch", "3", *TINY, "--num-workers", "1", "--unlabeled-batch-size", "2",
            "--method", '{"transition_fraction": 0.34}']
    uninterrupted, resumed = train_killed_and_resumed(args, "MNTrainer", results, tmp_path)
    assert_same_weights(uninterrupted, resumed, ("network", "networks"))
    assert uninterrupted["history"]["terms"][-1].keys() >= {"network_3d", "network_2d", "pseudo_rows"}
