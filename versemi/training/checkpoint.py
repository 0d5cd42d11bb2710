"""Checkpoints: written atomically, loaded with clear errors."""
from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import input_error


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
