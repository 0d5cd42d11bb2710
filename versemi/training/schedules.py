"""Weights and thresholds that move over training, as functions of progress in [0, 1]."""
from __future__ import annotations

import math


def sigmoid_rampup(progress: float) -> float:
    """exp(-5 (1 - t)^2): 0.007 at t = 0, 1 from t = 1 (Laine & Aila; the Mean Teacher ramp)."""
    progress = min(max(progress, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - progress) ** 2)


def linear(start: float, end: float, progress: float) -> float:
    """``start`` at t = 0 to ``end`` at t = 1, constant outside."""
    progress = min(max(progress, 0.0), 1.0)
    return start + (end - start) * progress
