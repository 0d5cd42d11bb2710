"""Validation: pseudo-Dice on patches each epoch, sliding-window Dice on whole cases at the end
(the predictor's sliding window, without mirroring, in fp32; the evaluation's Dice)."""
from __future__ import annotations

import numpy as np
import torch

from ..atomic import write_json
from ..evaluation.metrics import dice
from ..inference.sliding_window import sliding_window_probabilities
from ..model.plans_view import PlansView


def pseudo_dice_counts(logits: torch.Tensor, batch: dict, counts: dict) -> None:
    """Add per-prompt true/false positives and false negatives of a batch to ``counts``."""
    pred = logits.argmax(1, keepdim=True) == 1
    target = batch["target"] > 0.5
    for prompt in batch["prompt"].unique().tolist():
        sel = batch["prompt"] == prompt
        p, t = pred[sel], target[sel]
        tp, fp, fn = counts.get(prompt, (0, 0, 0))
        counts[prompt] = (tp + int((p & t).sum()), fp + int((p & ~t).sum()), fn + int((~p & t).sum()))


def sliding_window_validation(trainer) -> dict:
    """Dice per case and prompt on the fold's validation cases, in the preprocessed (cropped,
    resampled) grid, of the trained model (the mean of its members, if several); written to
    ``validation/summary.json``."""
    trainer.train_mode(False)
    cases = []
    for key in trainer.split["val"]:
        dataset = key.split("/", 1)[0]
        prompts = [(p["index"], p["label_value"]) for p in PlansView(trainer.plans).prompts_of(dataset)]
        data, seg = trainer.store.arrays(key)
        # ``predict_logits``: the members' mean where the trainer trains several networks
        probabilities = sliding_window_probabilities(trainer.predict_logits, data[:], [p for p, _ in prompts],
                                                     trainer.effective.patch_for(dataset), trainer.device, mirroring=False,
                                                     precision="fp32").cpu().numpy()
        labels = seg[:][0]
        cases.append({"case": key, "dice": {trainer.prompt_names[p]: dice(probabilities[i] > 0.5, labels == value)
                                            for i, (p, value) in enumerate(prompts)}})
    names = sorted({n for c in cases for n in c["dice"]})
    mean = {n: float(np.mean([c["dice"][n] for c in cases if n in c["dice"]])) for n in names}
    summary = {"space": "preprocessed grid (cropped to nonzero, resampled to the plan's spacing)",
               "mean_dice": mean, "cases": cases}
    write_json(summary, trainer.output_folder / "validation" / "summary.json")
    return summary
