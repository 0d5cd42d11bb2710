"""Pseudo-labels from a (teacher's) foreground probability: hard labels, sharpened soft labels,
confidence, and the largest connected component (BCP keeps only it: the left atrium, the
pancreas, one organ)."""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def hard_labels(probability: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """0/1 float labels; ``threshold`` 0.5 is the argmax of a 2-class softmax."""
    return (probability > threshold).float()


def sharpened(probability: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft labels ``p^(1/T) / (p^(1/T) + (1 - p)^(1/T))`` of a 2-class foreground probability
    (MixMatch's sharpening; C3S3's T = 0.1): T < 1 pushes them towards 0 and 1, T = 1 keeps them.
    Computed as ``sigmoid(logit(p) / T)``, which stays finite near 0 and 1."""
    p = probability.float().clamp(1e-7, 1 - 1e-7)
    return torch.sigmoid(torch.log(p / (1 - p)) / temperature)


def confidence(probability: torch.Tensor) -> torch.Tensor:
    """The probability of the predicted class, max(p, 1 - p), in [0.5, 1]."""
    return torch.maximum(probability, 1 - probability)


def largest_component(labels: torch.Tensor) -> torch.Tensor:
    """Per sample and channel, only the largest 26-connected foreground component of (B, C, *S)
    0/1 labels; an empty mask stays empty."""
    array = labels.detach().cpu().numpy() > 0.5
    out = np.zeros_like(array)
    structure = np.ones((3, 3, 3), dtype=bool)
    for index in np.ndindex(array.shape[:2]):
        components, count = ndimage.label(array[index], structure=structure)
        if count:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            out[index] = components == sizes.argmax()
    return torch.from_numpy(out).to(labels.device, labels.dtype)
