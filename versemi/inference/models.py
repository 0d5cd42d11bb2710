"""Trained folds: an experiment's checkpoints found, loaded and checked, their networks rebuilt,
and the ensemble they form. A checkpoint of a trainer with several networks holds
several members; by default each is one more model of the ensemble, or one is chosen by name."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .. import paths
from ..errors import InputError, Problem, input_error
from ..plans.view import PlansView

CHECKPOINT_KINDS = ("final", "best", "latest")
FOLD_ORDER = [str(i) for i in range(5)] + ["all"]
CHECKPOINT_KEYS = ("trainer", "fold", "configuration", "config", "plans", "network")


@dataclass
class FoldModel:
    """One trained fold's network (eval mode, on the ensemble's device) and patch size; ``member``
    names the network where the fold's trainer trained several (None: the fold has one)."""

    fold: str
    checkpoint: Path
    trainer: str
    network: torch.nn.Module
    patch_size: list[int]
    member: str | None = None


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


def find_experiment_dir(name: str | None = None, plans_root: Path | None = None) -> Path:
    """``results/<experiment>``: the named one, else the single planned experiment (or, where no
    experiment is planned on this machine, the single one with results)."""
    from ..training.run import find_experiment

    results = paths.results_root()
    trained = sorted(p.name for p in results.iterdir() if p.is_dir()) if results.is_dir() else []
    if name is None:
        try:
            name = find_experiment(plans_root or paths.plans_root(), None)
        except InputError:
            if len(trained) != 1:
                raise
            name = trained[0]
    folder = results / name
    if not folder.is_dir():
        raise input_error(folder, f"experiment {name!r} has no trained models (experiments with results: "
                                  f"{', '.join(trained) or 'none'})",
                          "train it with versemi_train, choose another with -e, or point $VERSEMI_RESULTS at "
                          "the results folder")
    return folder


def checkpoint_paths(experiment_dir: Path, folds: Iterable[str] | None = None, trainer: str = "VerSemiTrainer",
                     configuration: str = "3d_fullres", checkpoint: str = "final") -> list[Path]:
    """``<experiment>/<trainer>__<configuration>/fold_<f>/checkpoint_<checkpoint>.pth`` per fold.

    ``folds`` None: every fold folder present (``fold_all`` only where no numbered fold exists).
    """
    from ..training.run import parse_fold

    if checkpoint not in CHECKPOINT_KINDS:
        raise input_error(f"--checkpoint {checkpoint}", "unknown checkpoint",
                          f"use one of {', '.join(CHECKPOINT_KINDS)}")
    experiment_dir = Path(experiment_dir)
    model_dir = experiment_dir / f"{trainer}__{configuration}"
    if not model_dir.is_dir():
        present = sorted(p.name for p in experiment_dir.iterdir() if p.is_dir() and "__" in p.name) \
            if experiment_dir.is_dir() else []
        raise input_error(model_dir, f"no {trainer} model of configuration {configuration!r} was trained here "
                                     f"(trained: {', '.join(present) or 'none'})",
                          f"train one (versemi_train {configuration} fold0 -tr {trainer}), or choose -tr / -e")
    trained = [f for f in FOLD_ORDER if (model_dir / f"fold_{f}").is_dir()]
    if folds is None:
        folds = [f for f in trained if f != "all"] or trained
        if not folds:
            raise input_error(model_dir, "holds no fold_* folder", f"train a fold first (versemi_train {configuration} "
                                                                  f"fold0 -tr {trainer})")
    wanted = list(dict.fromkeys(parse_fold(str(f)) for f in folds))
    found, problems = [], []
    for fold in wanted:
        folder = model_dir / f"fold_{fold}"
        path = folder / f"checkpoint_{checkpoint}.pth"
        if not folder.is_dir():
            problems.append(Problem(str(folder), f"fold {fold} was never trained (trained folds: "
                                                 f"{', '.join(trained) or 'none'})",
                                    f"train it (versemi_train {configuration} {fold} -tr {trainer}), or choose "
                                    "trained folds with -f"))
        elif not path.is_file():
            present = sorted(p.name for p in folder.glob("checkpoint_*.pth"))
            problems.append(Problem(str(path), f"missing (present: {', '.join(present) or 'no checkpoint'}); the "
                                               "fold's training has not finished",
                                    f"finish it (versemi_train {configuration} {fold} -tr {trainer} --continue), or "
                                    "choose another --checkpoint"))
        else:
            found.append(path)
    if problems:
        raise InputError(problems)
    return found


def load_models(experiment_dir_or_checkpoints: str | Path | Sequence[str | Path], folds: Iterable[str] | None = None,
                trainer: str = "VerSemiTrainer", configuration: str = "3d_fullres", checkpoint: str = "final",
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
    from ..training.checkpoint import load_checkpoint

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


def member_names(state: dict) -> list[str]:
    """The members of a checkpoint: the main network's name, then every further network with a
    plan (a checkpoint of one network, or of an older version, has one member, ``main``)."""
    extra = [name for name, entry in state.get("networks", {}).items() if entry.get("network_plan")]
    return [state.get("network_name", "main"), *extra]


def _fold_models(state, path: Path, device: torch.device, member: str | None = None) -> list[FoldModel]:
    """The checkpoint's members (or the one named ``member``) rebuilt, in eval mode on ``device``."""
    from ..nets import build_network
    from ..training.config import TrainingConfig
    from ..training.trainers import find_trainer

    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise input_error(path, f"is not a versemi training checkpoint (lacks {', '.join(missing)})",
                          "use a checkpoint_*.pth written by versemi_train")
    names = member_names(state)
    if member is not None and member not in names:
        raise input_error(path, f"holds no member {member!r} (members: {', '.join(names)})",
                          "choose one of its members with --member, or leave it out to average them all")
    wanted = names if member is None else [member]
    fold, out = str(state["fold"]), []
    try:
        config = TrainingConfig.from_dict(state["config"])
        plans = state["plans"]
        patch_size = list(config.patch_size or PlansView(plans).configuration(state["configuration"])["patch_size"])
        for name in wanted:
            if name != names[0]:  # a further member: always stored with its plan
                entry = state["networks"][name]
                network = build_network(entry["network_plan"], plans["in_channels"], plans["num_prompts"])
                network.load_state_dict(entry["network"])
            elif state.get("network_plan"):  # the network as trained, stored in the checkpoint
                network = build_network(state["network_plan"], plans["in_channels"], plans["num_prompts"])
                network.load_state_dict(state["network"])
            else:
                # checkpoints of older versions, and methods with their own build_network: the trainer
                # builds it (building a trainer only reads the plans, it writes nothing)
                trainer = find_trainer(state["trainer"])(plans, path.parent, state["configuration"], fold,
                                                         path.parent, config, "cpu")
                network, patch_size = trainer.build_network(), list(trainer.patch_size)
                network.load_state_dict(state["network"])
            network.to(device).eval()
            out.append(FoldModel(fold, Path(path), state["trainer"], network, patch_size,
                                 name if len(names) > 1 else None))
    except (TypeError, KeyError, ValueError, RuntimeError) as exc:
        raise input_error(path, f"the network cannot be rebuilt from the checkpoint ({type(exc).__name__}: "
                                f"{str(exc)[:200]})",
                          "use a checkpoint written by this version of versemi_train, or train again") from exc
    return out
