"""The fair baseline: the same network and data, labeled cases only."""
from __future__ import annotations

from ..trainer import Trainer


class SupervisedTrainer(Trainer):
    """Dice + cross-entropy on labeled patches, each sample through its own prompt."""

    uses_unlabeled = False
