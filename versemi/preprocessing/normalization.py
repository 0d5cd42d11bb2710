"""Intensity normalization as planned per channel (see plans.json ``normalization``)."""
from __future__ import annotations

import numpy as np


def normalize(image: np.ndarray, channel_plans: list[dict]) -> np.ndarray:
    """Normalize a float32 ``(c, z, y, x)`` image in place, one plan entry per channel."""
    nonzero = None
    for c, plan in enumerate(channel_plans):
        channel = image[c]
        if plan["scheme"] == "ct":
            np.clip(channel, plan["clip"][0], plan["clip"][1], out=channel)
            channel -= plan["mean"]
            channel /= max(plan["std"], 1e-8)
        elif plan["scheme"] == "zscore":
            if plan.get("use_nonzero_mask"):
                if nonzero is None:
                    nonzero = np.any(image != 0, axis=0)
                values = channel[nonzero]
                mean, std = (values.mean(), values.std()) if values.size else (0.0, 1.0)
                channel -= mean
                channel /= max(std, 1e-8)
                channel[~nonzero] = 0
            else:
                mean, std = channel.mean(), channel.std()
                channel -= mean
                channel /= max(std, 1e-8)
        else:
            raise ValueError(f"unknown normalization scheme {plan['scheme']!r}")
    return image
