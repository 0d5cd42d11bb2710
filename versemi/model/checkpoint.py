"""The checkpoint of a trained fold: the one file training hands to prediction, bundles and the
benchmark. A ``torch.save`` of a dict, written atomically, with these keys:

    trainer, fold, configuration   the run that wrote it
    plans, config                  the experiment's plans and the run's ``TrainingConfig`` (dicts)
    patch_size, network_plan       the patch and main network after the run's overrides
                                   (``model.config.effective_configuration``); network_plan None: a
                                   method built its own network (both absent in older versions)
    dataset_patch_sizes            datasets that trained with a patch of their own, and prediction
                                   slides over their images (None or absent: one patch for all)
    network, network_name          the main network's weights and its member name
    networks                       further networks by name: network, network_plan (None: used in
                                   training only, not a member), optimizer, scheduler
    epoch, best_ema, history, optimizer, scheduler, scaler, extra, rng
                                   what ``versemi_train --continue`` picks up again
    warm_start                     the checkpoint the run started from (``--init-from``): path, trainer,
                                   fold, sha256, members loaded and left as initialised, the stage
                                   skipped; None: the run started from initialised weights

``REQUIRED_KEYS`` are what prediction needs; the rest may be missing in older versions.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import input_error

REQUIRED_KEYS = ("trainer", "fold", "configuration", "config", "plans", "network")
MAIN_MEMBER = "main"  # the main network's name where a checkpoint does not record one


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path, suffix=".pth") as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint; a missing or damaged file is an InputError naming it."""
    if not Path(path).is_file():
        raise input_error(path, "checkpoint does not exist", "train this fold first (versemi_train)")
    try:
        # our own checkpoints hold numpy RNG state and plain dicts; weights_only would refuse them
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise input_error(path, f"checkpoint cannot be read ({type(exc).__name__}: {str(exc)[:150]})",
                          "delete it and train again, or restore it from a backup") from exc


def check_trained_model(state, path: Path) -> None:
    """An InputError naming ``path`` unless ``state`` holds what prediction needs."""
    missing = [k for k in REQUIRED_KEYS if k not in state] if isinstance(state, dict) else list(REQUIRED_KEYS)
    if missing:
        raise input_error(path, f"is not a versemi training checkpoint (lacks {', '.join(missing)})",
                          "use a checkpoint_*.pth written by versemi_train")


def member_names(state: dict) -> list[str]:
    """The members of a checkpoint: the main network's name, then every further network with a
    plan (a checkpoint of one network, or of an older version, has one member, ``main``)."""
    extra = [name for name, entry in state.get("networks", {}).items() if entry.get("network_plan")]
    return [state.get("network_name", MAIN_MEMBER), *extra]
