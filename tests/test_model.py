"""The trained model's home (``versemi.model``): the effective configuration and the checkpoint
rebuild, on small hand-made plans (no training)."""
from __future__ import annotations

import pytest
import torch

from versemi.errors import InputError
from versemi.inference import load_models
from versemi.model.config import TrainingConfig, effective_configuration
from versemi.model.network import member_networks
from versemi.plans.topology import pool_and_conv_props

SPACING = [1.0, 1.0, 1.0]


def _plans() -> dict:
    topology = pool_and_conv_props(SPACING, [32, 64, 64])
    return {"in_channels": 1, "num_prompts": 2,
            "configurations": {"3d_fullres": {"patch_size": topology.patch_size, "batch_size": 2,
                                              "topology_spacing": SPACING, "network": topology.network_plan()}}}


def test_the_plan_holds_without_overrides():
    plans = _plans()
    effective = effective_configuration(plans, "3d_fullres", TrainingConfig())
    assert effective.patch_size == plans["configurations"]["3d_fullres"]["patch_size"]
    assert effective.network_plan == plans["configurations"]["3d_fullres"]["network"]


def test_overrides_rederive_the_topology_and_set_features_and_deep_supervision():
    config = TrainingConfig(patch_size=[16, 32, 32], features=[4, 8], deep_supervision=True)
    effective = effective_configuration(_plans(), "3d_fullres", config)
    smaller = pool_and_conv_props(SPACING, [16, 32, 32])
    assert effective.patch_size == [16, 32, 32]
    assert effective.network_plan["strides"] == smaller.strides
    assert effective.network_plan["features"] == [4] + [8] * (len(smaller.strides) - 1)
    assert effective.network_plan["deep_supervision"] is True


def _checkpoint(plans: dict, config: TrainingConfig) -> dict:
    """A checkpoint as an older version wrote it: no patch size, no network plan."""
    from versemi.nets import build_network

    network = build_network(effective_configuration(plans, "3d_fullres", config).network_plan, 1, 2)
    return {"trainer": "SupervisedTrainer", "fold": "0", "configuration": "3d_fullres", "config": config.to_dict(),
            "plans": plans, "network": network.state_dict()}


def test_an_older_checkpoint_is_rebuilt_from_its_plans_and_settings(tmp_path):
    config = TrainingConfig(patch_size=[16, 32, 32], features=[4, 8])
    torch.save(_checkpoint(_plans(), config), tmp_path / "older.pth")
    ensemble = load_models([tmp_path / "older.pth"])
    assert ensemble.models[0].patch_size == [16, 32, 32]
    assert list(ensemble.models[0].network.divisor) == pool_and_conv_props(SPACING, [16, 32, 32]).divisor


def test_a_network_that_cannot_be_derived_is_a_clear_error(tmp_path):
    state = _checkpoint(_plans(), TrainingConfig(features=[4, 8]))
    del state["plans"]["configurations"]["3d_fullres"]["network"]
    with pytest.raises(InputError) as caught:
        member_networks(state, tmp_path / "older.pth")
    message = str(caught.value)
    assert "older.pth" in message and "stores no network plan" in message and "train the fold again" in message


def test_a_stored_plan_that_does_not_fit_the_weights_is_a_clear_error(tmp_path):
    state = _checkpoint(_plans(), TrainingConfig(features=[4, 8]))
    state["network_plan"] = effective_configuration(state["plans"], "3d_fullres", TrainingConfig()).network_plan
    with pytest.raises(InputError, match="the network cannot be rebuilt from the checkpoint"):
        member_networks(state, tmp_path / "other.pth")
