"""``versemi_train --init-from CHECKPOINT``: a new run that starts from another run's weights.

Any trainer's checkpoint serves, as long as it was trained with the same network plan (features,
kernels, strides, deep supervision, ...), the same prompt table (datasets and labels) and the same
input channels; otherwise the run is refused with one error naming every difference. Only
weights are taken: optimizer, epoch, LR schedule and history start afresh, as in any new run.

How the loop uses it (``Trainer.setup``, ``Trainer.add_network``):
- the main network loads the checkpoint's main member before ``on_train_start``, so every teacher
  made there (``add_teacher``, a method's own EMA copies) is a copy of the loaded weights;
- a further member (``add_network`` with a plan) loads the checkpoint's member of the same name
  and plan when it has one, and otherwise stays as initialised, which the training log says;
  parts used in training only (e.g. projection heads) always start as initialised;
- ``record`` is what the checkpoint keeps of the start (``TrainerState.warm_start``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import input_error
from ..model.checkpoint import MAIN_MEMBER, check_trained_model, load_checkpoint
from ..model.network import trained_configuration
from ..model.plans_view import PlansView

MISMATCH_FIX = ("start from a checkpoint trained with this run's network (--features, --patch-size, "
                "--deep-supervision), prompts and input channels, or leave out --init-from")


def plain(value):
    """``value`` as JSON would give it back (tuples as lists), so stored and derived plans compare."""
    return json.loads(json.dumps(value))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mismatches(their_plan: dict, their_plans: dict, our_plan: dict, our_plans: dict) -> list[str]:
    """What differs between a checkpoint's main network plan and plans and this run's."""
    theirs, ours = plain(their_plan), plain(our_plan)
    found = [f"network {key} {theirs.get(key)} in the checkpoint, {ours.get(key)} in this run"
             for key in sorted(set(theirs) | set(ours)) if theirs.get(key) != ours.get(key)]
    their_prompts = list(PlansView(their_plans).prompt_names().values())
    our_prompts = list(PlansView(our_plans).prompt_names().values())
    if their_prompts != our_prompts:
        found.append(f"prompts {', '.join(their_prompts)} in the checkpoint, {', '.join(our_prompts)} in this run")
    if their_plans["in_channels"] != our_plans["in_channels"]:
        found.append(f"input channels {their_plans['in_channels']} in the checkpoint, {our_plans['in_channels']} "
                     "in this run")
    return found


class WarmStart:
    """A checkpoint checked against the run it starts, handing out its members' weights."""

    def __init__(self, path: Path | str, network_plan: dict, plans: dict):
        self.path = Path(path)
        checkpoint = load_checkpoint(self.path)
        check_trained_model(checkpoint, self.path)
        main_plan = trained_configuration(checkpoint, self.path).network_plan
        found = mismatches(main_plan, checkpoint["plans"], network_plan, plans)
        if found:
            raise input_error(self.path, f"does not fit this run: {'; '.join(found)}", MISMATCH_FIX)
        self.trainer, self.fold = checkpoint["trainer"], checkpoint["fold"]
        self.main_weights = checkpoint["network"]
        main_name = checkpoint.get("network_name", MAIN_MEMBER)
        # member name -> (plan, weights); every member of the trained model, the main one first
        self.members = {main_name: (plain(main_plan), checkpoint["network"]),
                        **{name: (plain(entry["network_plan"]), entry["network"])
                           for name, entry in checkpoint.get("networks", {}).items() if entry.get("network_plan")}}
        self.loaded: list[str] = []   # this run's members that took the checkpoint's weights
        self.left: list[str] = []     # and those that start as initialised

    @property
    def headline(self) -> str:
        return f"warm start from {self.path} ({self.trainer}, fold {self.fold})"

    def load_main(self, model: torch.nn.Module, name: str) -> None:
        self._load(model, self.main_weights)
        self.loaded.append(name)

    def load_member(self, name: str, network_plan: dict, model: torch.nn.Module) -> None:
        """Loads the checkpoint's member ``name`` into ``model`` if it has one of ``network_plan``."""
        plan, weights = self.members.get(name, (None, None))
        if plan != plain(network_plan):
            self.left.append(name)
            return
        self._load(model, weights)
        self.loaded.append(name)

    def leave(self, name: str) -> None:
        """A further network the method trains from its own start, which no checkpoint gives (e.g.
        M&N's 2d network without 2d weights): counted as left as initialised, so the stage that
        trains it first is kept."""
        self.left.append(name)

    def _load(self, model: torch.nn.Module, weights: dict) -> None:
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:  # a method that builds its own network from the same plan
            raise input_error(self.path, f"its weights do not fit this run's network ({str(exc)[:300]})",
                              MISMATCH_FIX) from exc

    def record(self) -> dict:
        """What a checkpoint keeps of the start."""
        return {"path": str(self.path), "trainer": self.trainer, "fold": self.fold,
                "sha256": file_sha256(self.path), "loaded": list(self.loaded), "left_as_initialised": list(self.left)}
