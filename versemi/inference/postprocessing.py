"""Postprocessing of binary predictions."""
from __future__ import annotations

import numpy as np

CONNECTIVITY_STRUCTURE_RANK = {6: 1, 18: 2, 26: 3}


def largest_connected_component(mask: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Keep only the largest connected component of a boolean 3D ``mask`` (a bool array).

    ``connectivity`` is 6 (faces), 18 (faces and edges) or 26 (faces, edges and corners). An empty
    mask stays empty; of equally large components the first in array order is kept.
    """
    if connectivity not in CONNECTIVITY_STRUCTURE_RANK:
        raise ValueError(f"connectivity must be 6, 18 or 26; got {connectivity}")
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    try:
        import cc3d

        labels = cc3d.connected_components(mask.astype(np.uint8, copy=False), connectivity=connectivity)
    except ImportError:  # connected-components-3d is optional; scipy gives the same components
        from scipy.ndimage import generate_binary_structure, label

        labels, _ = label(mask, structure=generate_binary_structure(3, CONNECTIVITY_STRUCTURE_RANK[connectivity]))
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(counts.argmax())
