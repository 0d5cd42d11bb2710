"""What training changes as it trains, held in one object: checkpoints save it and ``--continue``
applies it again, and the time-budget warm-up takes a copy of it and puts it back afterwards.

``TrainerState.capture(trainer)`` refers to the trainer's own tensors (``state_dict`` copies
nothing); ``copy.deepcopy`` it to keep it while training goes on. The random generators are the
process's, not the trainer's: a checkpoint stores them beside the state (``random_state``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..errors import input_error


@dataclass
class TrainerState:
    epoch: int
    best_ema: float
    history: dict
    network: dict
    optimizer: dict
    scheduler: dict
    scaler: dict
    networks: dict   # further networks by name: network, network_plan, optimizer, scheduler
    extra: dict      # the teachers' weights by name and the method's own state
    warm_start: dict | None  # the checkpoint the run started from (--init-from); None: initialised weights

    @classmethod
    def capture(cls, trainer) -> TrainerState:
        return cls(epoch=trainer.epoch, best_ema=trainer.best_ema, history=trainer.log.history,
                   network=trainer.model.state_dict(), optimizer=trainer.optimizer.state_dict(),
                   scheduler=trainer.scheduler.state_dict(), scaler=trainer.scaler.state_dict(),
                   # a member the method never trained (supervised_throughout) is stored without its plan,
                   # so prediction and warm starts leave it out; --continue still restores it by name
                   networks={name: {"network": e.model.state_dict(),
                                    "network_plan": None if trainer.supervised_throughout else e.network_plan,
                                    "optimizer": e.optimizer.state_dict(), "scheduler": e.scheduler.state_dict()}
                             for name, e in trainer.extra_networks.items()},
                   extra=trainer.method_state(), warm_start=trainer.warm_start)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> TrainerState:
        # checkpoints of older versions may lack these entries
        absent = {"networks": {}, "warm_start": None}
        return cls(**{f.name: checkpoint.get(f.name, absent[f.name]) if f.name in absent else checkpoint[f.name]
                      for f in fields(cls)})

    def to_checkpoint(self) -> dict:
        """The checkpoint entries of the state (``versemi.model.checkpoint`` names them all)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def apply(self, trainer, source: Path | str = "the saved state") -> None:
        """Put the state into ``trainer`` (set up with the same networks); ``source`` names it in errors."""
        trainer.model.load_state_dict(self.network)
        trainer.optimizer.load_state_dict(self.optimizer)
        trainer.scheduler.load_state_dict(self.scheduler)
        trainer.scaler.load_state_dict(self.scaler)
        missing = sorted(set(trainer.extra_networks) - set(self.networks))
        if missing:
            raise input_error(source, f"holds no network {', '.join(map(repr, missing))} of {type(trainer).__name__}",
                              "continue with the trainer that wrote it, or move the folder away to start over")
        for name, extra in trainer.extra_networks.items():
            saved = self.networks[name]
            extra.model.load_state_dict(saved["network"])
            extra.optimizer.load_state_dict(saved["optimizer"])
            extra.scheduler.load_state_dict(saved["scheduler"])
        trainer.epoch, trainer.best_ema, trainer.warm_start = self.epoch, self.best_ema, self.warm_start
        trainer.log.history = self.history
        trainer.load_method_state(self.extra)


def random_state() -> dict:
    """The process's random generators (torch, numpy, Python), as a checkpoint stores them."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_random_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
