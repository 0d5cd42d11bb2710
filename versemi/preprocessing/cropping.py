"""Cropping to the region where any channel is nonzero (the body), as nnU-Net does."""
from __future__ import annotations

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice, get_bbox_from_mask


def nonzero_bbox(image: np.ndarray) -> list[list[int]]:
    """Bounding box ``[[lo, hi), ...]`` per spatial axis of voxels nonzero in any channel.

    An all-zero image keeps its full extent rather than collapsing to nothing.
    """
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return [[0, s] for s in mask.shape]
    return [list(map(int, b)) for b in get_bbox_from_mask(mask)]


def crop(array: np.ndarray, bbox: list[list[int]]) -> np.ndarray:
    """Crop the trailing three (spatial) axes of ``array`` to ``bbox``."""
    return array[(Ellipsis,) + bounding_box_to_slice(bbox)]
