"""Ellipses fitted to 2D masks: the fetal head circumference (HC18's clinical measure).

The HC18 challenge measures a fetal head by the circumference of an ellipse fitted to its outline.
Here the outline of a mask is the set of midpoints of the edges between an inside and an outside
pixel (the pixelated boundary itself, half a pixel outside the boundary pixels' centres, so a
filled disc of radius r gives a radius r, not r - 0.5), in millimetres from the pixel spacing.
The ellipse is the direct least-squares fit of Fitzgibbon, Pilu and Fisher (1999), in the
numerically stable form of Halir and Flusser (1998); its circumference is Ramanujan's second
approximation (relative error below 1e-9 for a head's eccentricity).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Ellipse:
    center: tuple[float, float]  # (y, x), in the points' units
    semi_axes: tuple[float, float]  # (major, minor)
    angle: float  # radians, of the major axis against the x axis

    @property
    def circumference(self) -> float:
        return ellipse_circumference(*self.semi_axes)


def ellipse_circumference(a: float, b: float) -> float:
    """Ramanujan's second approximation of an ellipse's perimeter from its semi-axes."""
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def fit_ellipse(points: np.ndarray) -> Ellipse | None:
    """Direct least-squares ellipse through ``points`` (N, 2) as (y, x); None when no ellipse fits
    (fewer than 6 points, or points on a line)."""
    points = np.asarray(points, dtype=np.float64)
    if len(points) < 6:
        return None
    # centre and scale first: the scatter matrices are then well conditioned
    mean = points.mean(0)
    scale = np.abs(points - mean).max() or 1.0
    y, x = ((points - mean) / scale).T
    quadratic = np.stack([x * x, x * y, y * y], 1)
    linear = np.stack([x, y, np.ones_like(x)], 1)
    s1, s2, s3 = quadratic.T @ quadratic, quadratic.T @ linear, linear.T @ linear
    try:
        t = -np.linalg.solve(s3, s2.T)
    except np.linalg.LinAlgError:
        return None
    m = s1 + s2 @ t
    m = np.stack([m[2] / 2, -m[1], m[0] / 2])  # the constraint 4ac - b^2 = 1, inverted
    values, vectors = np.linalg.eig(m)
    vectors = np.real(vectors)
    constraint = 4 * vectors[0] * vectors[2] - vectors[1] ** 2
    candidates = np.flatnonzero(constraint > 0)
    if candidates.size == 0:
        return None
    quad = vectors[:, candidates[0]]
    a, b, c = quad
    d, e, f = t @ quad
    return _from_conic(a, b, c, d, e, f, mean, scale)


def _from_conic(a, b, c, d, e, f, mean, scale) -> Ellipse | None:
    """Centre, semi-axes and angle of ``a x^2 + b xy + c y^2 + d x + e y + f = 0`` (scaled coordinates)."""
    discriminant = b * b - 4 * a * c
    if discriminant >= 0:
        return None
    x0 = (2 * c * d - b * e) / discriminant
    y0 = (2 * a * e - b * d) / discriminant
    # the conic's value at the centre; the quadratic form's eigenvalues give the axes
    f0 = a * x0 * x0 + b * x0 * y0 + c * y0 * y0 + d * x0 + e * y0 + f
    eigenvalues, eigenvectors = np.linalg.eigh(np.array([[a, b / 2], [b / 2, c]]))
    if f0 == 0 or np.any(-f0 / eigenvalues <= 0):
        return None
    axes = np.sqrt(-f0 / eigenvalues) * scale  # the smaller eigenvalue gives the major axis
    major = int(np.argmax(axes))
    direction = eigenvectors[:, major]  # (x, y)
    angle = math.atan2(direction[1], direction[0]) % math.pi
    return Ellipse((float(y0 * scale + mean[0]), float(x0 * scale + mean[1])),
                   (float(axes[major]), float(axes[1 - major])), angle)


def outline_points(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """(N, 2) (y, x) points in spacing units: the midpoints of every edge between a mask pixel and
    a background pixel (the image border counts as background)."""
    inside = np.pad(np.asarray(mask, dtype=bool), 1)
    points = []
    for axis in (0, 1):
        change = inside[1:] != inside[:-1] if axis == 0 else inside[:, 1:] != inside[:, :-1]
        ys, xs = np.nonzero(change)
        # an edge between padded rows i and i + 1 lies at original row i - 0.5
        coordinates = np.stack([ys - 0.5, xs - 1.0], 1) if axis == 0 else np.stack([ys - 1.0, xs - 0.5], 1)
        points.append(coordinates)
    return np.concatenate(points) * np.asarray(spacing, dtype=np.float64)


def head_circumference(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> float | None:
    """The circumference (spacing units, e.g. mm) of the ellipse fitted to a 2D mask's outline;
    None for an empty mask or one no ellipse fits."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a head circumference is measured on a 2D mask; got shape {mask.shape}")
    if not mask.any():
        return None
    ellipse = fit_ellipse(outline_points(mask, spacing))
    return None if ellipse is None else ellipse.circumference
