"""Shape priors of elliptical structures in 2d images (the fetal head): how regular a predicted
region is, pseudo-labels refined by a fitted ellipse, and reflection across the ellipse's axis.

Every function takes one image plane per row, ``(B, H, W)`` tensors (a 2d configuration's
``(B, 1, 1, H, W)`` batches squeezed), in pixel units of the network's grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..ellipse import fit_ellipse, outline_points

SOBEL_X = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 8.0
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def _filter(planes: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    return F.conv2d(planes[:, None].float(), kernel.to(planes.device)[None, None], padding=1)[:, 0]


def edge_roughness(probability: torch.Tensor) -> torch.Tensor:
    """(B,) the mean Sobel gradient magnitude of each probability map: low for one smooth region,
    high for speckle and ragged, uncertain borders."""
    gx, gy = _filter(probability, SOBEL_X), _filter(probability, SOBEL_X.T)
    return torch.sqrt(gx ** 2 + gy ** 2 + 1e-6).mean(dim=(1, 2))


def contour_irregularity(probability: torch.Tensor) -> torch.Tensor:
    """(B,) the mean absolute Laplacian of the distance transform of each map's region (p > 0.5):
    small where the distance field is smooth (a convex, regular region), large along the many
    ridges of a fragmented or jagged one."""
    regions = (probability > 0.5).cpu().numpy()
    distances = torch.from_numpy(np.stack([ndimage.distance_transform_edt(r) for r in regions]).astype(np.float32))
    return _filter(distances.to(probability.device), LAPLACIAN).abs().mean(dim=(1, 2))


def regularity_score(probability: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B,) ERSR's dual score, lower is more regular: ``alpha`` x edge roughness + (1 - alpha) x
    contour irregularity."""
    return alpha * edge_roughness(probability) + (1 - alpha) * contour_irregularity(probability)


def most_regular(scores: torch.Tensor, share: float) -> torch.Tensor:
    """Indices of the ``share`` of rows with the lowest scores (at least one), in row order."""
    keep = max(1, math.ceil(share * scores.numel()))
    return torch.sort(torch.argsort(scores)[:keep]).values


@dataclass(frozen=True)
class SymmetryAxis:
    """A line through ``center`` (y, x) along ``direction`` (unit (y, x)): the ellipse's major axis."""

    center: tuple[float, float]
    direction: tuple[float, float]
    fitted: bool  # False: no ellipse fitted, the image's vertical centre line stands in


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def refine_with_ellipse(probability: np.ndarray, threshold: float, fill: float, power: float,
                        decay: float, refine: bool = True) -> tuple[np.ndarray, SymmetryAxis]:
    """ERSR's ellipse-constrained pseudo-label of one (H, W) probability map.

    The largest connected region above ``threshold`` is fitted with a least-squares ellipse. With
    ``d`` the normalized ellipse distance (1 on the ellipse), pixels inside are raised to at least
    ``fill + (1 - d) ** power`` (most near the centre), pixels outside are damped by
    ``exp(-decay (d - 1))``; the refined map above ``threshold`` is the label. Where no ellipse fits
    (no region, too few outline points), the label is the unrefined map above ``threshold``.
    ``refine=False`` (the ablation without refinement) keeps that unrefined label everywhere and
    only fits the ellipse for its axis. Returns the 0/1 label and the ellipse's major axis (the
    symmetry axis).
    """
    height, width = probability.shape
    region = largest_component(probability > threshold)
    ellipse = fit_ellipse(outline_points(region)) if region.any() else None
    if ellipse is None or min(ellipse.semi_axes) <= 0:
        return (probability > threshold).astype(np.float32), SymmetryAxis(((height - 1) / 2, (width - 1) / 2),
                                                                          (1.0, 0.0), False)
    (cy, cx), (major, minor), angle = ellipse.center, ellipse.semi_axes, ellipse.angle
    axis = SymmetryAxis((cy, cx), (math.sin(angle), math.cos(angle)), True)
    if not refine:
        return (probability > threshold).astype(np.float32), axis
    yy, xx = np.mgrid[:height, :width].astype(np.float64)
    along = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    across = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
    distance = (along / major) ** 2 + (across / minor) ** 2
    refined = probability.astype(np.float64)
    inside = distance <= 1
    refined[inside] = np.maximum(refined[inside], np.clip(fill + (1 - distance[inside]) ** power, 0, 1))
    refined[~inside] *= np.exp(-decay * (distance[~inside] - 1))
    return (refined > threshold).astype(np.float32), axis


def _axis_tensors(axes: list[SymmetryAxis], device) -> tuple[torch.Tensor, torch.Tensor]:
    centers = torch.tensor([a.center for a in axes], dtype=torch.float32, device=device).view(-1, 2, 1, 1)
    directions = torch.tensor([a.direction for a in axes], dtype=torch.float32, device=device).view(-1, 2, 1, 1)
    return centers, directions


def _grid(rows: int, height: int, width: int, device) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    return torch.stack([yy, xx])[None].expand(rows, -1, -1, -1)  # (B, 2, H, W) as (y, x)


def first_side(shape: tuple[int, int, int], axes: list[SymmetryAxis], device) -> torch.Tensor:
    """(B, H, W) 0/1: the pixels on one side of each row's axis (the other side is 1 - this)."""
    centers, directions = _axis_tensors(axes, device)
    offset = _grid(*shape, device) - centers
    normal = torch.stack([directions[:, 1], -directions[:, 0]], 1)  # the axis turned by 90 degrees
    return ((offset * normal).sum(1) < 0).float()


def reflect(planes: torch.Tensor, axes: list[SymmetryAxis]) -> torch.Tensor:
    """(B, C, H, W) ``planes`` mirrored across each row's axis (nearest pixel; outside the image:
    the nearest border pixel, as the public ERSR code)."""
    rows, _, height, width = planes.shape
    centers, directions = _axis_tensors(axes, planes.device)
    offset = _grid(rows, height, width, planes.device) - centers
    along = (offset * directions).sum(1, keepdim=True)
    mirrored = 2 * along * directions - offset + centers  # (B, 2, H, W) source pixel of each pixel
    y = mirrored[:, 0].round().clamp(0, height - 1).long()
    x = mirrored[:, 1].round().clamp(0, width - 1).long()
    index = (y * width + x).view(rows, 1, -1).expand(-1, planes.shape[1], -1)
    return planes.flatten(2).gather(2, index).view_as(planes)


def symmetric_halves(planes: torch.Tensor, side: torch.Tensor, axes: list[SymmetryAxis]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each half of ``planes`` (B, C, H, W) (within ``side`` and outside it) completed by its own
    mirror image: two maps that are symmetric about the axis."""
    first, second = planes * side[:, None], planes * (1 - side[:, None])
    return first + reflect(first, axes), second + reflect(second, axes)
