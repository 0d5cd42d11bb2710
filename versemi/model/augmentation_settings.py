"""The augmentation settings of a training run: part of ``TrainingConfig``, so every checkpoint
holds them; ``versemi.training.augmentation`` turns them into transforms."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AugmentationSettings:
    enabled: bool = True
    rotation_degrees: float = 30.0
    rotation_degrees_2d: float = 180.0  # 2d configuration: in-plane only, any angle (nnU-Net's 2d pipeline)
    p_rotation: float = 0.2
    scale: tuple[float, float] = (0.7, 1.4)
    p_scale: float = 0.2
    elastic: bool = False  # nnU-Net v2 default: off
    p_noise: float = 0.1
    p_blur: float = 0.2
    p_brightness: float = 0.15
    p_contrast: float = 0.15
    p_low_resolution: float = 0.25
    p_gamma: float = 0.3
    mirror_axes: tuple[int, ...] = (0, 1, 2)  # (z, y, x); a 2d configuration mirrors only y and x
    # the patch is cut this much larger before rotation/scaling so that no empty corners come in
    spatial_margin: float = 1.25
