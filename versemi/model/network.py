"""Every member network of a checkpoint, rebuilt from what the checkpoint stores: prediction,
bundles and the benchmark need ``versemi.nets`` for it, never the trainer that wrote it."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import input_error
from ..nets import build_network
from .checkpoint import member_names
from .config import EffectiveConfiguration, TrainingConfig, effective_configuration

REBUILD_FIX = "use a checkpoint written by this version of versemi_train, or train the fold again"


def trained_configuration(state: dict, path: Path) -> EffectiveConfiguration:
    """The patch and main network the run trained with: as stored, or, in checkpoints of older
    versions that stored neither, derived from the stored plans and settings as training did."""
    if state.get("patch_size") and state.get("network_plan"):
        # checkpoints from before per-dataset patches store none: they trained one patch
        return EffectiveConfiguration(list(state["patch_size"]), state["network_plan"], state.get("dataset_patch_sizes"))
    try:
        derived = effective_configuration(state["plans"], state["configuration"],
                                          TrainingConfig.from_dict(state["config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise input_error(path, "stores no network plan (an older version, or a method that builds its own "
                                f"network), and none can be derived from its plans and settings "
                                f"({type(exc).__name__}: {str(exc)[:200]})", REBUILD_FIX) from exc
    return EffectiveConfiguration(list(state.get("patch_size") or derived.patch_size),
                                  state.get("network_plan") or derived.network_plan,
                                  state.get("dataset_patch_sizes") if state.get("patch_size") else derived.dataset_patch_sizes)


def member_networks(state: dict, path: Path, member: str | None = None) -> dict[str, torch.nn.Module]:
    """The checkpoint's members by name (or only ``member``), weights loaded, in eval mode on the CPU."""
    names = member_names(state)
    if member is not None and member not in names:
        raise input_error(path, f"holds no member {member!r} (members: {', '.join(names)})",
                          "choose one of its members with --member, or leave it out to average them all")
    plans, networks = state["plans"], {}
    for name in names if member is None else [member]:
        if name == names[0]:
            plan, weights = trained_configuration(state, path).network_plan, state["network"]
        else:  # a further member is always stored with its plan
            plan, weights = state["networks"][name]["network_plan"], state["networks"][name]["network"]
        try:
            network = build_network(plan, plans["in_channels"], plans["num_prompts"])
            network.load_state_dict(weights)
        except (TypeError, KeyError, ValueError, RuntimeError) as exc:
            raise input_error(path, f"the network cannot be rebuilt from the checkpoint ({type(exc).__name__}: "
                                    f"{str(exc)[:200]})", REBUILD_FIX) from exc
        networks[name] = network.eval()
    return networks
