"""Training log: a text file, and progress.png with losses, every loss term, Dice and learning rate per epoch."""
from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..atomic import atomic_path  # noqa: E402


class TrainingLog:
    def __init__(self, folder: Path, history: dict | None = None):
        self.file = folder / "training_log.txt"
        self.png = folder / "progress.png"
        self.history = history or {"epoch": [], "train_loss": [], "val_loss": [], "lr": [], "dice": [],
                                    "ema_dice": [], "epoch_seconds": [], "iteration_losses": [], "terms": []}

    def write(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {message}"
        with open(self.file, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def record(self, **values) -> None:
        for key, value in values.items():
            self.history.setdefault(key, []).append(value)

    def plot(self) -> None:
        h = self.history
        if not h["epoch"]:
            return
        fig, (ax_loss, ax_terms, ax_dice, ax_lr) = plt.subplots(4, 1, figsize=(9, 13), sharex=True)
        ax_loss.plot(h["epoch"], h["train_loss"], "o-", ms=3, label="train loss")
        ax_loss.plot(h["epoch"], h["val_loss"], "o-", ms=3, label="validation loss")
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
        # one curve per term the trainer returns (older logs have none); terms absent in an epoch show as gaps
        terms = h.get("terms") or []
        epochs = h["epoch"][-len(terms):] if terms else []
        names = sorted({k for t in terms for k in t} - {"loss"})
        for name in names:
            ax_terms.plot(epochs, [t.get(name, float("nan")) for t in terms], "o-", ms=3, label=name)
        ax_terms.set_ylabel("loss terms (weighted)")
        if names:
            ax_terms.legend(fontsize=8)
        prompts = sorted({k for d in h["dice"] for k in d})
        for prompt in prompts:
            ax_dice.plot(h["epoch"], [d.get(prompt, float("nan")) for d in h["dice"]], "o-", ms=3, label=f"pseudo-Dice {prompt}")
        ax_dice.plot(h["epoch"], h["ema_dice"], "k--", label="mean (EMA)")
        ax_dice.set_ylabel("Dice")
        ax_dice.set_ylim(0, 1)
        ax_dice.legend(fontsize=8)
        ax_lr.plot(h["epoch"], h["lr"], "o-", ms=3)
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_xlabel("epoch")
        fig.tight_layout()
        with atomic_path(self.png, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=80)
        plt.close(fig)
