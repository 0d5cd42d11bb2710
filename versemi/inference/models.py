"""Trained folds: an experiment's checkpoints loaded and checked (``versemi.model``), and the
ensemble their networks form. A checkpoint of a trainer with several networks holds
several members; by default each is one more model of the ensemble, or one is chosen by name."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..errors import input_error
from ..model.checkpoint import check_trained_model, load_checkpoint, member_names
from ..model.layout import checkpoint_paths
from ..model.config import patch_of
from ..model.network import member_networks, trained_configuration
from ..model.plans_view import DEFAULT_CONFIGURATION


@dataclass
class FoldModel:
    """One trained fold's network (eval mode, on the ensemble's device) and patch size; ``member``
    names the network where the fold's trainer trained several (None: the fold has one);
    ``dataset_patch_sizes``: the datasets of a joint plan that trained with a patch of their own."""

    fold: str
    checkpoint: Path
    trainer: str
    network: torch.nn.Module
    patch_size: list[int]
    member: str | None = None
    dataset_patch_sizes: dict[str, list[int]] | None = None

    def patch_for(self, dataset: str | None) -> list[int]:
        """The window that slides over ``dataset``'s images: its own patch, else the shared one."""
        return patch_of(self.patch_size, self.dataset_patch_sizes, dataset)


@dataclass
class Ensemble:
    """The folds of one experiment (they share plans), each with one model per member of its
    checkpoint (or the chosen member); probabilities are averaged over all ``models``."""

    plans: dict
    configuration: str
    models: list[FoldModel]
    device: torch.device
    precision: str = "auto"  # of the network: auto, bf16, fp16, fp32 (sliding_window.inference_dtype)

    @property
    def folds(self) -> list[str]:
        return [m.fold for m in self.models]

    @property
    def members(self) -> list[str | None]:
        """Each model's member name (None for folds with one network), in the order of ``models``."""
        return [m.member for m in self.models]

    @property
    def in_channels(self) -> int:
        return int(self.plans["in_channels"])


def load_models(experiment_dir_or_checkpoints: str | Path | Sequence[str | Path], folds: Iterable[str] | None = None,
                trainer: str = "VerSemiTrainer", configuration: str = DEFAULT_CONFIGURATION, checkpoint: str = "final",
                device: str | torch.device = "cpu", member: str | None = None) -> Ensemble:
    """The trained folds of an experiment folder (``results/<experiment>``), or the given checkpoint
    files, each network rebuilt exactly as its training built it, in eval mode on ``device``.

    All checkpoints must hold the same plans (one experiment) and configuration. ``folds``,
    ``trainer``, ``configuration`` and ``checkpoint`` choose the files in an experiment folder
    (``folds`` None: every fold folder present); given checkpoint files are used as they are.
    A checkpoint with several networks (of a trainer that trains several) gives
    one model per member, so the ensemble averages them like folds; ``member`` keeps only the
    network of that name from every checkpoint.

    Raises:
        InputError: a missing or foreign checkpoint, checkpoints of other plans or configurations,
            or a ``member`` that a checkpoint does not hold (the message lists the members).
    """
    device = torch.device(device)
    source = experiment_dir_or_checkpoints
    if isinstance(source, (str, Path)):
        source = Path(source)
        if source.is_dir():
            files = checkpoint_paths(source, folds, trainer, configuration, checkpoint)
        elif source.exists():
            files = [source]
        else:
            raise input_error(source, "does not exist", "give an experiment folder results/<experiment> or "
                                                        "checkpoint files")
    else:
        files = [Path(p) for p in source]
        if not files:
            raise ValueError("load_models needs at least one checkpoint")
    models, plans, first, configuration_name = [], None, None, None
    for path in files:
        state = load_checkpoint(path, "cpu")
        fold_models = _fold_models(state, path, device, member)
        if plans is None:
            plans, first, configuration_name = state["plans"], path, state["configuration"]
        elif _canonical(state["plans"]) != _canonical(plans):
            raise input_error(path, f"holds other plans than {first} (experiment {state['plans'].get('experiment')!r} "
                                    f"vs {plans.get('experiment')!r}, or planned again since)",
                              "ensemble only folds trained on the same plans of one experiment")
        elif state["configuration"] != configuration_name:
            raise input_error(path, f"configuration {state['configuration']!r} differs from {configuration_name!r} "
                                    f"of {first}", "ensemble folds of one configuration")
        models.extend(fold_models)
        del state
    return Ensemble(plans, configuration_name, models, device)


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _fold_models(state, path: Path, device: torch.device, member: str | None = None) -> list[FoldModel]:
    """The checkpoint's members (or the one named ``member``) rebuilt, in eval mode on ``device``."""
    check_trained_model(state, path)
    networks = member_networks(state, path, member)
    trained = trained_configuration(state, path)
    several = len(member_names(state)) > 1
    return [FoldModel(str(state["fold"]), Path(path), state["trainer"], network.to(device), trained.patch_size,
                      name if several else None, trained.dataset_patch_sizes)
            for name, network in networks.items()]
