"""Validation: pseudo-Dice on patches each epoch, sliding-window Dice on whole cases at the end."""
from __future__ import annotations

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from ..atomic import write_json
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


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    denominator = pred.sum() + ref.sum()
    return 1.0 if denominator == 0 else float(2 * (pred & ref).sum() / denominator)


@torch.no_grad()
def predict_case_probabilities(model, data: np.ndarray, prompts: list[int], patch_size,
                               device: torch.device, overlap: float = 0.5) -> torch.Tensor:
    """Target-class probabilities (K, Z, Y, X) of all ``prompts`` by Gaussian sliding window, one backbone
    pass per window; ``model(x, prompts)`` returns logits (a network, or ``Trainer.predict_logits``)."""
    image = torch.from_numpy(np.ascontiguousarray(data))[None].to(device)
    prompt_tensor = torch.tensor(prompts, device=device)

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        logits = model(windows, prompt_tensor.expand(windows.shape[0], -1))  # (B, K, 2, ...)
        return torch.softmax(logits.float(), dim=2)[:, :, 1]

    return sliding_window_inference(image, list(patch_size), sw_batch_size=2, predictor=predictor,
                                    overlap=overlap, mode="gaussian")[0]


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
        probabilities = predict_case_probabilities(trainer.predict_logits, data[:], [p for p, _ in prompts],
                                                   trainer.patch_size, trainer.device).cpu().numpy()
        labels = seg[:][0]
        cases.append({"case": key, "dice": {trainer.prompt_names[p]: dice(probabilities[i] > 0.5, labels == value)
                                            for i, (p, value) in enumerate(prompts)}})
    names = sorted({n for c in cases for n in c["dice"]})
    mean = {n: float(np.mean([c["dice"][n] for c in cases if n in c["dice"]])) for n in names}
    summary = {"space": "preprocessed grid (cropped to nonzero, resampled to the plan's spacing)",
               "mean_dice": mean, "cases": cases}
    write_json(summary, trainer.output_folder / "validation" / "summary.json")
    return summary
