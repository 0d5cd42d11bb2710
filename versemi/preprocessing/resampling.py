"""Resampling to the target spacing, nnU-Net style.

Images use third-order splines; segmentations are resampled one label at a time with linear
interpolation of its mask (smoother than nearest neighbour, never invents labels). When the
spacing is anisotropic (one axis > 3x coarser), that axis is resampled separately with nearest
neighbour, so that thick slices are not blurred into each other. A target spacing of ``None``
along an axis keeps the source's spacing there (the ``2d`` configuration never resamples across
slices).
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import zoom

ANISOTROPY_RATIO = 3.0


def concrete_target(spacing, target_spacing) -> list[float]:
    """The target spacing with every ``None`` axis replaced by the source's spacing."""
    return [float(s) if t is None else float(t) for s, t in zip(spacing, target_spacing)]


def resampled_shape(shape, spacing, target_spacing) -> list[int]:
    target_spacing = concrete_target(spacing, target_spacing)
    return [max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target_spacing)]


def anisotropic_axis(spacing) -> int | None:
    spacing = np.asarray(spacing, dtype=float)
    return int(np.argmax(spacing)) if spacing.max() / spacing.min() > ANISOTROPY_RATIO else None


def _separate_axis(spacing, target_spacing) -> int | None:
    """The axis to resample on its own: anisotropic in the source, else in the target."""
    axis = anisotropic_axis(spacing)
    return axis if axis is not None else anisotropic_axis(target_spacing)


def _zoom_axes(volume: np.ndarray, new_shape, order: int, axes) -> np.ndarray:
    factors = [n / o if a in axes else 1.0 for a, (n, o) in enumerate(zip(new_shape, volume.shape))]
    if all(f == 1.0 for f in factors):
        return volume
    return zoom(volume, factors, order=order, mode="nearest", grid_mode=True)


def _resample_volume(volume: np.ndarray, new_shape, order: int, separate_axis: int | None) -> np.ndarray:
    if separate_axis is None:
        return _zoom_axes(volume, new_shape, order, {0, 1, 2})
    in_plane = {0, 1, 2} - {separate_axis}
    volume = _zoom_axes(volume, new_shape, order, in_plane)
    return _zoom_axes(volume, new_shape, 0, {separate_axis})


def resample_image(image: np.ndarray, spacing, target_spacing) -> np.ndarray:
    """Resample a ``(c, z, y, x)`` float image from ``spacing`` to ``target_spacing``."""
    new_shape = resampled_shape(image.shape[1:], spacing, target_spacing)
    if list(new_shape) == list(image.shape[1:]):
        return image
    target_spacing = concrete_target(spacing, target_spacing)
    axis = _separate_axis(spacing, target_spacing)
    return np.stack([_resample_volume(c, new_shape, 3, axis) for c in image]).astype(np.float32, copy=False)


def resample_segmentation(seg: np.ndarray, spacing, target_spacing) -> np.ndarray:
    """Resample an integer ``(z, y, x)`` segmentation, one label mask at a time (order 1)."""
    new_shape = resampled_shape(seg.shape, spacing, target_spacing)
    if list(new_shape) == list(seg.shape):
        return seg
    target_spacing = concrete_target(spacing, target_spacing)
    axis = _separate_axis(spacing, target_spacing)
    out = np.zeros(new_shape, dtype=seg.dtype)
    for value in np.unique(seg):
        if value == 0:
            continue
        mask = _resample_volume((seg == value).astype(np.float32), new_shape, 1, axis)
        out[mask >= 0.5] = value
    return out
