"""The one path between a raw image and the network's grid, used by the preprocessing cache, the
predictor, the bundle's reference and the benchmarks, so training and prediction see identical input.

Forward (``to_network_input``): crop to the region where any channel is nonzero, normalize as the
dataset plan says, resample to the plan's spacing. Back (``to_input_grid``): probabilities on the
network's grid resampled to the cropped shape (trilinear), then placed into the input's full
shape (0 outside the crop).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .cropping import crop, nonzero_bbox
from .normalization import normalize
from .resampling import resample_image


@dataclass
class CroppedImage:
    """An image cropped to its nonzero region, and where that region lies in the input."""

    image: np.ndarray | None     # float32 (c, z, y, x), the crop in its own memory; None once released
    bbox: list[list[int]]        # [[lo, hi), ...] per spatial axis of the input
    full_shape: tuple[int, ...]  # the input's (z, y, x)
    spacing_zyx: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """The crop's (z, y, x)."""
        return tuple(hi - lo for lo, hi in self.bbox)


def crop_to_nonzero(image: np.ndarray, spacing_zyx) -> CroppedImage:
    """Crop a (c, z, y, x) image to the voxels nonzero in any channel (an all-zero image keeps its extent)."""
    bbox = nonzero_bbox(image)
    return CroppedImage(np.ascontiguousarray(crop(image, bbox), dtype=np.float32), bbox, tuple(image.shape[1:]),
                        tuple(float(s) for s in spacing_zyx))


def network_grid(cropped: CroppedImage, dataset_plan: dict, *, keep_crop: bool = True) -> np.ndarray:
    """The cropped image normalized and resampled as ``dataset_plan`` says: the network's input.

    ``keep_crop`` False lets normalization work in the crop's own memory (one copy fewer) and
    releases the crop: for the last plan the crop goes through."""
    if cropped.image is None:
        raise ValueError("the crop was released by an earlier network_grid(keep_crop=False)")
    source = cropped.image.copy() if keep_crop else cropped.image
    if not keep_crop:
        cropped.image = None  # normalized in place below: no longer the crop
    return resample_image(normalize(source, dataset_plan["normalization"]), cropped.spacing_zyx,
                          dataset_plan["target_spacing"])


def to_network_input(image: np.ndarray, spacing_zyx, dataset_plan: dict) -> tuple[np.ndarray, CroppedImage]:
    """(network input, the crop) of a raw (c, z, y, x) image: crop, normalize, resample."""
    cropped = crop_to_nonzero(image, spacing_zyx)
    return network_grid(cropped, dataset_plan, keep_crop=False), cropped


def resize_probabilities(probabilities: torch.Tensor, shape) -> np.ndarray:
    """Trilinear resampling of a (Z, Y, X) or (K, Z, Y, X) probability map to ``shape`` (float32 numpy)."""
    shape = tuple(int(s) for s in shape)
    channels = probabilities[None] if probabilities.dim() == 3 else probabilities
    if tuple(channels.shape[1:]) != shape:
        try:
            channels = F.interpolate(channels[None].float(), size=shape, mode="trilinear", align_corners=False)[0]
        except RuntimeError as exc:
            if channels.device.type != "cuda" or "out of memory" not in str(exc):
                raise
            torch.cuda.empty_cache()  # the stitched map fits on the GPU, its resampled copy did not
            channels = F.interpolate(channels.cpu()[None].float(), size=shape, mode="trilinear", align_corners=False)[0]
    channels = channels.float().cpu().numpy()
    return channels[0] if probabilities.dim() == 3 else channels


def uncrop(array: np.ndarray, cropped: CroppedImage, fill=0) -> np.ndarray:
    """``array`` (..., crop's z, y, x) placed into the input's full shape, ``fill`` outside the crop."""
    full = np.full((*array.shape[:-3], *cropped.full_shape), fill, array.dtype)
    full[(Ellipsis, *(slice(lo, hi) for lo, hi in cropped.bbox))] = array
    return full


def to_input_grid(probabilities: torch.Tensor, cropped: CroppedImage) -> np.ndarray:
    """Probabilities on the network's grid ((Z, Y, X) or (K, Z, Y, X)) in the input's full shape (0 outside the crop)."""
    return uncrop(resize_probabilities(probabilities, cropped.shape), cropped)
