"""nnU-Net-style data augmentation with batchgenerators transforms.

Settings live in ``AugmentationSettings`` (``versemi.model``: every checkpoint stores them);
``build_transforms`` turns them into one Compose.
The transforms draw from numpy's global random state, which the loader seeds per batch, so a
batch is a pure function of (seed, stream, iteration) and a resumed run sees the same batches.
"""
from __future__ import annotations

import numpy as np
from batchgenerators.transforms.abstract_transforms import Compose
from batchgenerators.transforms.color_transforms import (BrightnessMultiplicativeTransform,
                                                         ContrastAugmentationTransform, GammaTransform)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

from ..model.augmentation_settings import AugmentationSettings


def source_patch_size(patch_size, settings: AugmentationSettings) -> list[int]:
    """Size of the region to cut before the spatial transform (the patch itself when disabled)."""
    if not settings.enabled:
        return list(patch_size)
    return [int(np.ceil(p * settings.spatial_margin)) for p in patch_size]


def build_transforms(patch_size, settings: AugmentationSettings) -> Compose | None:
    """The augmentation pipeline for ``{'data': (b,c,z,y,x), 'seg': (b,1,z,y,x)}`` batches."""
    if not settings.enabled:
        return None
    angle = np.deg2rad(settings.rotation_degrees)
    return Compose([
        SpatialTransform(list(patch_size), patch_center_dist_from_border=None, do_elastic_deform=settings.elastic,
                         do_rotation=True, angle_x=(-angle, angle), angle_y=(-angle, angle), angle_z=(-angle, angle),
                         do_scale=True, scale=settings.scale, border_mode_data="constant", border_cval_data=0,
                         order_data=3, border_mode_seg="constant", border_cval_seg=0, order_seg=1,
                         random_crop=False, p_el_per_sample=0.2, p_scale_per_sample=settings.p_scale,
                         p_rot_per_sample=settings.p_rotation),
        GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_sample=settings.p_noise),
        GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=True, p_per_sample=settings.p_blur,
                              p_per_channel=0.5),
        BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=settings.p_brightness),
        ContrastAugmentationTransform(p_per_sample=settings.p_contrast),
        SimulateLowResolutionTransform(zoom_range=(0.5, 1), per_channel=True, p_per_channel=0.5, order_downsample=0,
                                       order_upsample=3, p_per_sample=settings.p_low_resolution),
        GammaTransform((0.7, 1.5), invert_image=True, per_channel=True, retain_stats=True, p_per_sample=0.1),
        GammaTransform((0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True,
                       p_per_sample=settings.p_gamma),
        MirrorTransform(settings.mirror_axes),
    ])
