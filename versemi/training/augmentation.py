"""nnU-Net-style data augmentation with batchgenerators transforms.

Settings live in ``AugmentationSettings`` (``versemi.model``: every checkpoint stores them);
``build_transforms`` turns them into one Compose. A 2d configuration's batches are one slice
deep, ``(b, c, 1, y, x)``: they are augmented as 2d images (``augment``), rotated in-plane by any
angle and mirrored along y and x only, as nnU-Net's 2d pipeline does.
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


def source_patch_size(patch_size, settings: AugmentationSettings, spatial_dims: int = 3) -> list[int]:
    """Size of the region to cut before the spatial transform (the patch itself when disabled);
    in 2d the slice axis stays one slice."""
    if not settings.enabled:
        return list(patch_size)
    size = [int(np.ceil(p * settings.spatial_margin)) for p in patch_size]
    return [1, *size[1:]] if spatial_dims == 2 else size


def build_transforms(patch_size, settings: AugmentationSettings, spatial_dims: int = 3) -> Compose | None:
    """The augmentation pipeline for ``{'data': (b,c,z,y,x), 'seg': (b,1,z,y,x)}`` batches, or for
    2d batches ``(b,c,y,x)`` when ``spatial_dims`` is 2 (``patch_size`` stays (1, y, x))."""
    if not settings.enabled:
        return None
    if spatial_dims == 2:
        patch_size = list(patch_size)[1:]
        angle = np.deg2rad(settings.rotation_degrees_2d)
        mirror_axes = tuple(a - 1 for a in settings.mirror_axes if a > 0)  # (z, y, x) -> (y, x)
    else:
        angle = np.deg2rad(settings.rotation_degrees)
        mirror_axes = tuple(settings.mirror_axes)
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
        MirrorTransform(mirror_axes),
    ])


def augment(transforms: Compose, batch: dict, spatial_dims: int) -> dict:
    """Apply ``transforms`` to a batch of (b, c, z, y, x) arrays; 2d batches go through as 2d images."""
    if spatial_dims == 3:
        return transforms(**batch)
    out = transforms(**{key: value[:, :, 0] for key, value in batch.items()})
    return {key: value[:, :, None] for key, value in out.items()}
