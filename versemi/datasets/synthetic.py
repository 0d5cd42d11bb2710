"""Deterministic synthetic demo datasets: ``DemoLA`` (MRI-like) and ``DemoPancreas`` (CT-like).

They are small enough to generate and preprocess in seconds on a CPU, yet not trivial to segment:
the target shares its intensity range with neighbouring distractor structures, so a network has to
learn shape and context rather than a threshold.

Every case draws from its own generator, seeded by (seed, dataset, split, case index), so the
output is byte-reproducible and independent of the number of worker processes, and a test case is
never a copy of a training case with the same index.

Geometry is built in millimetres around the volume centre, so shapes stay round on the
anisotropic CT grid. Arrays are ``(z, y, x)`` as everywhere in ``versemi.datasets.io``; the sizes
in ``SyntheticConfig`` are ``(x, y, z)`` like a spacing.
"""
from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from ..errors import input_error
from ..parallel import map_with_progress
from .io import Geometry, write_image
from .layout import IMAGES_TR, IMAGES_TS, IMAGES_UNLABELED, LABELS_TR, LABELS_TS, write_dataset_json

DEMO_DATASETS = ("DemoLA", "DemoPancreas")
PANCREAS_SPACING = (0.8, 0.8, 2.5)  # (x, y, z) mm: thick axial slices, as in abdominal CT
FILE_ENDING = ".nii.gz"
MIN_SHAPE = 12  # below this the structures and the border margin no longer fit

# Split name -> (case id tag, images folder, labels folder or None, seed key).
_SPLITS = {
    "labeled": ("", IMAGES_TR, LABELS_TR, 0),
    "unlabeled": ("u", IMAGES_UNLABELED, None, 1),
    "test": ("t", IMAGES_TS, LABELS_TS, 2),
}
_BORDER = 2  # voxels kept free of foreground on every side


@dataclass
class SyntheticConfig:
    """How many cases of each kind, their sizes (x, y, z voxels) and the random seed."""

    num_labeled: int = 8
    num_unlabeled: int = 16
    num_test: int = 4
    shape_la: tuple[int, int, int] = (64, 64, 64)
    shape_pancreas: tuple[int, int, int] = (96, 96, 32)
    seed: int = 0
    spacing_la: float = 1.0  # isotropic mm


# ----------------------------------------------------------------------------- grid and primitives

@dataclass(frozen=True)
class _Grid:
    """A voxel grid in (z, y, x) order with physical coordinates centred on the volume."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def half(self) -> np.ndarray:
        """Half the physical extent per axis (mm)."""
        return np.array(self.shape) * np.array(self.spacing) / 2

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Open-grid coordinates (mm) of the voxel centres, broadcastable to ``shape``."""
        out = []
        for axis, (n, s) in enumerate(zip(self.shape, self.spacing)):
            view = [1, 1, 1]
            view[axis] = n
            out.append(((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s).reshape(view))
        return tuple(out)  # type: ignore[return-value]

    def voxel_index(self, points_mm: np.ndarray) -> np.ndarray:
        """Nearest voxel indices of (N, 3) physical points, clipped into the grid."""
        index = np.rint(points_mm / np.array(self.spacing) + (np.array(self.shape) - 1) / 2).astype(int)
        return np.clip(index, 0, np.array(self.shape) - 1)


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation matrix about ``axis`` by ``angle`` radians (Rodrigues)."""
    x = axis / np.linalg.norm(axis)
    k = np.array([[0, -x[2], x[1]], [x[2], 0, -x[0]], [-x[1], x[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def _random_rotation(rng: np.random.Generator, max_angle: float = np.pi) -> np.ndarray:
    return _rotation(_unit(rng), rng.uniform(-max_angle, max_angle))


def _frame_along(tangent: np.ndarray) -> np.ndarray:
    """Rotation whose first column follows ``tangent`` and third stays close to the z axis."""
    e1 = tangent / np.linalg.norm(tangent)
    z = np.array([1.0, 0.0, 0.0]) - e1[0] * e1
    e3 = z / np.linalg.norm(z)
    return np.stack([e1, np.cross(e3, e1), e3], axis=1)


def _ellipsoid_radius(axes, center, radii, rotation=None) -> np.ndarray:
    """Normalised radius of every voxel w.r.t. an ellipsoid: < 1 inside, 1 on the surface.

    The ellipsoid's semi-axes ``radii`` (mm) lie along the columns of ``rotation``.
    """
    rotation = np.eye(3) if rotation is None else rotation
    d = [axes[i] - np.float32(center[i]) for i in range(3)]
    r2 = 0.0
    for k in range(3):
        axis = rotation[:, k].astype(np.float32)
        u = d[0] * axis[0] + d[1] * axis[1] + d[2] * axis[2]
        r2 = r2 + np.square(u / np.float32(radii[k]))
    return np.sqrt(r2)


def _smooth_noise(rng: np.random.Generator, grid: _Grid, sigma_mm: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``sigma_mm``.

    Drawn on a coarser grid and upsampled linearly, which keeps wide kernels cheap.
    """
    sigma_vox = np.array([sigma_mm / s for s in grid.spacing])
    factor = np.maximum(1, np.floor(sigma_vox / 2)).astype(int)
    coarse_shape = tuple(int(np.ceil(n / f)) + 1 for n, f in zip(grid.shape, factor))
    field = ndimage.gaussian_filter(rng.standard_normal(coarse_shape, dtype=np.float32),
                                    sigma=sigma_vox / factor, mode="wrap", truncate=3.0)
    for axis, (n, f) in enumerate(zip(grid.shape, factor)):
        field = _upsample_axis(field, axis, n, int(f))
    return (field - field.mean()) / (field.std() + 1e-6)


def _upsample_axis(field: np.ndarray, axis: int, size: int, factor: int) -> np.ndarray:
    """Linear interpolation along one axis by an integer factor, cropped to ``size``."""
    if factor == 1:
        return np.take(field, np.arange(size), axis=axis)
    position = np.arange(size) / factor
    below = np.floor(position).astype(int)
    weight = (position - below).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(field.ndim)])
    return np.take(field, below, axis=axis) * (1 - weight) + np.take(field, below + 1, axis=axis) * weight


def _bias_field(rng: np.random.Generator, grid: _Grid, strength: float) -> np.ndarray:
    """Smooth multiplicative field (an MRI coil's shading): exp of a random quadratic polynomial."""
    log_field = np.zeros(grid.shape, np.float32)
    for axis, h in zip(grid.axes(), grid.half):
        u = axis / np.float32(h)
        log_field = log_field + np.float32(rng.normal(0, strength)) * u \
            + np.float32(rng.normal(0, strength / 2)) * (u * u - np.float32(1 / 3))
    return np.exp(log_field)


def _bezier(p0, p1, p2, spacing_mm: float) -> np.ndarray:
    """Points along a quadratic Bezier curve, about ``spacing_mm`` apart."""
    length = np.linalg.norm(p1 - p0) + np.linalg.norm(p2 - p1)
    t = np.linspace(0, 1, max(2, int(np.ceil(length / spacing_mm)) + 1))[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _tubes_distance(grid: _Grid, centrelines: list[np.ndarray], radii: list[np.ndarray]) -> np.ndarray:
    """Signed distance (mm, < 0 inside) to tubes of varying radius around the centrelines.

    One Euclidean distance transform serves all tubes; its nearest-seed indices pick the radius.
    """
    seeds = np.zeros(grid.shape, bool)
    radius_at = np.zeros(grid.shape, np.float32)
    for points, r in zip(centrelines, radii):
        index = tuple(grid.voxel_index(points).T)
        seeds[index] = True
        radius_at[index] = r
    distance, nearest = ndimage.distance_transform_edt(~seeds, sampling=grid.spacing, return_indices=True)
    return distance.astype(np.float32) - radius_at[tuple(nearest)]


def _clip_into(points: np.ndarray, grid: _Grid, margin_mm) -> np.ndarray:
    """Clip physical points so that they stay ``margin_mm`` away from the volume border."""
    limit = grid.half - np.asarray(margin_mm)
    return np.clip(points, -limit, limit)


def _interior(shape, border: int = _BORDER) -> np.ndarray:
    inside = np.zeros(shape, bool)
    inside[tuple(slice(border, n - border) for n in shape)] = True
    return inside


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    return labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)


def _shell(mask: np.ndarray, voxels: int = 1) -> np.ndarray:
    """The voxels just outside ``mask``."""
    return ndimage.binary_dilation(mask, iterations=voxels) & ~mask


# ----------------------------------------------------------------------------- DemoLA (MRI)

def _atrium_body(rng, grid: _Grid, axes) -> tuple[np.ndarray, np.ndarray, float]:
    """Irregular atrium blob: a perturbed ellipsoid plus an appendage lobe. Returns mask, centre, radius."""
    h = grid.half
    center = rng.uniform(-0.1, 0.1, 3) * h
    radii = h.min() * rng.uniform(0.36, 0.48, 3)
    radius = float(radii.mean())
    level = _ellipsoid_radius(axes, center, radii, _random_rotation(rng))
    appendage = center + _unit(rng) * radius * 0.8
    level = np.minimum(level, _ellipsoid_radius(axes, appendage, radius * rng.uniform(0.3, 0.45, 3),
                                                _random_rotation(rng)))
    # Low-frequency noise on the level set makes the surface bumpy rather than quadric.
    level = level + 0.12 * _smooth_noise(rng, grid, 0.4 * radius)
    return level < 1, center, radius


def _pulmonary_veins(rng, grid: _Grid, center, radius: float) -> np.ndarray:
    """2-4 curved, slightly tapering tubes that start inside the atrium and run outwards."""
    centrelines, radii = [], []
    for _ in range(rng.integers(2, 5)):
        direction = _unit(rng)
        tube_r = max(radius * rng.uniform(0.16, 0.24), max(grid.spacing))
        length = grid.half.min() * rng.uniform(0.5, 0.9)
        start = center + direction * radius * 0.5
        end = center + direction * (radius + length)
        bend = np.cross(direction, _unit(rng)) * length * rng.uniform(0.2, 0.5)
        points = _bezier(start, (start + end) / 2 + bend, end, 0.4 * min(grid.spacing))
        # Keep the whole tube, not just its centreline, clear of the border.
        points = _clip_into(points, grid, tube_r + (_BORDER + 1) * np.array(grid.spacing))
        centrelines.append(points)
        radii.append(tube_r * np.linspace(1.0, 0.75, len(points)))
    return _tubes_distance(grid, centrelines, radii) < 0


def _paint_la_background(rng, grid: _Grid, axes, blood: float, center, radius: float) -> np.ndarray:
    """Soft tissue, dark lungs, bright fat and other blood pools of near-atrial brightness."""
    h = grid.half
    tissue = blood * rng.uniform(0.3, 0.45)
    image = tissue * (1 + 0.15 * _smooth_noise(rng, grid, 3.0))
    for side in (-1, 1):  # lungs: large low-signal regions left and right
        lung_c = np.array([0, rng.uniform(-0.2, 0.2) * h[1], side * rng.uniform(0.8, 1.0) * h[2]])
        lung = _ellipsoid_radius(axes, lung_c, h * rng.uniform(0.45, 0.6, 3)) < 1
        image[lung] = blood * rng.uniform(0.05, 0.15)
    # Other chambers and great vessels around the atrium: the distractors a threshold cannot reject.
    for _ in range(rng.integers(3, 6)):
        r = radius * rng.uniform(0.5, 0.9, 3)
        c = center + _unit(rng) * (radius + r.mean() * rng.uniform(0.9, 1.3))
        pool = _ellipsoid_radius(axes, _clip_into(c, grid, 0.1 * h), r, _random_rotation(rng)) < 1
        image[pool] = blood * rng.uniform(0.8, 1.05)
    return image


def _la_case(rng: np.random.Generator, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """One MRI-like left-atrium case: (int16 image, uint8 label), both (z, y, x)."""
    axes = grid.axes()
    atrium, center, radius = _atrium_body(rng, grid, axes)
    label = (atrium | _pulmonary_veins(rng, grid, center, radius)) & _interior(grid.shape)

    blood = rng.uniform(220, 320)
    image = _paint_la_background(rng, grid, axes, blood, center, radius)
    image[label] = (blood * (1 + 0.06 * _smooth_noise(rng, grid, 4.0)))[label]  # slow-flow inhomogeneity
    wall = _shell(label)  # thin dark myocardial wall, only partly visible
    image[wall] = 0.5 * image[wall] + 0.5 * blood * rng.uniform(0.25, 0.45)

    body_r = _ellipsoid_radius(axes, [0, *(rng.uniform(-0.05, 0.05, 2) * grid.half[1:])],
                               [np.inf, *(grid.half[1:] * rng.uniform(1.25, 1.4, 2))])
    fat = (body_r > 0.86) & (body_r < 0.95)  # bright subcutaneous fat, as in bSSFP
    image[fat] = blood * rng.uniform(0.7, 0.9)

    image = ndimage.gaussian_filter(image, 0.6) * _bias_field(rng, grid, 0.2)  # partial volume, coil
    sigma = blood * rng.uniform(0.05, 0.09)
    noisy = np.hypot(image + sigma * rng.standard_normal(grid.shape, dtype=np.float32),
                     sigma * rng.standard_normal(grid.shape, dtype=np.float32))  # Rician magnitude
    body = (body_r < 1) | label
    noisy[~body] = 0
    return np.clip(np.rint(noisy), 0, np.iinfo(np.int16).max).astype(np.int16), label.astype(np.uint8)


# ----------------------------------------------------------------------------- DemoPancreas (CT)

def _pancreas_mask(rng, grid: _Grid, axes, fine: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Lobulated, elongated organ: overlapping ellipsoids along an arched curve, head to tail.

    Returns the mask and the curve's key points (head, bend, tail) for placing neighbours.
    """
    h = grid.half
    hxy = h[1:].min()
    head = np.array([rng.uniform(-0.2, 0.0) * h[0], rng.uniform(-0.05, 0.15) * h[1],
                     -rng.uniform(0.35, 0.5) * h[2]])
    tail = np.array([head[0] + rng.uniform(0.1, 0.3) * h[0], rng.uniform(-0.05, 0.2) * h[1],
                     rng.uniform(0.4, 0.55) * h[2]])
    bend = (head + tail) / 2 + np.array([0, -rng.uniform(0.15, 0.35) * h[1], 0])  # arches over the spine
    turn = _rotation(np.array([1.0, 0, 0]), rng.uniform(-0.35, 0.35))  # in-plane orientation
    offset = rng.uniform(-0.08, 0.08, 3) * h
    head, bend, tail = (turn @ p + offset for p in (head, bend, tail))

    n = rng.integers(5, 8)
    t = np.linspace(0, 1, n)
    centers = ((1 - t) ** 2)[:, None] * head + (2 * (1 - t) * t)[:, None] * bend + (t ** 2)[:, None] * tail
    step = np.linalg.norm(tail - head) / (n - 1)
    level = np.full(grid.shape, np.inf, np.float32)
    for i, c in enumerate(centers):
        taper = 1 - 0.45 * t[i]  # the head is thickest, the tail thinnest
        radii = np.array([step * rng.uniform(0.7, 0.9), hxy * 0.3 * taper * rng.uniform(0.9, 1.1),
                          h[0] * 0.36 * taper * rng.uniform(0.85, 1.15)])
        c = _clip_into(c, grid, radii.max() * 1.3 + (_BORDER + 1) * np.array(grid.spacing))
        tangent = 2 * (1 - t[i]) * (bend - head) + 2 * t[i] * (tail - bend)
        level = np.minimum(level, _ellipsoid_radius(axes, c, radii, _frame_along(tangent)))
    # Fine noise on the level set gives the lobulated surface; stray lobules are dropped.
    organ = _largest_component(((level + 0.18 * fine) < 1) & _interior(grid.shape))
    return organ, [head, bend, tail]


def _paint_abdomen(rng, grid: _Grid, axes, coarse: np.ndarray, keypoints) -> np.ndarray:
    """Air, fat, muscle, spine, vessels, solid organs and bowel loops, in HU."""
    h = grid.half
    hxy = h[1:].min()
    body_r = _ellipsoid_radius(axes, [0, *(rng.uniform(-0.05, 0.05, 2) * h[1:])],
                               [np.inf, *(h[1:] * rng.uniform(1.15, 1.3, 2))])
    body = body_r < 1
    image = np.full(grid.shape, -1000.0, np.float32)
    image[body] = (rng.uniform(-110, -80) + 15 * coarse)[body]  # visceral and subcutaneous fat
    image[(body_r > 0.84) & (body_r < 0.93)] = rng.uniform(40, 60)  # abdominal wall muscle

    # Spine: vertebral body with a dense cortical rim, psoas muscles on either side.
    spine_c = np.array([0, rng.uniform(0.6, 0.7) * h[1], rng.uniform(-0.05, 0.05) * h[2]])
    spine_radii = [np.inf, 0.17 * hxy, 0.21 * hxy]
    spine_r = _ellipsoid_radius(axes, spine_c, spine_radii)
    for side in (-1, 1):
        psoas_c = spine_c + np.array([0, 0.05 * h[1], side * 0.38 * hxy])
        image[_ellipsoid_radius(axes, psoas_c, [np.inf, 0.14 * hxy, 0.12 * hxy]) < 1] = rng.uniform(40, 60)
    image[spine_r < 1] = rng.uniform(700, 1000)
    image[spine_r < 0.78] = (rng.uniform(250, 400) + 40 * coarse)[spine_r < 0.78]

    # Aorta and vena cava in front of the spine (unenhanced: soft-tissue HU).
    aorta_c = spine_c + np.array([0, -0.3 * hxy, 0.12 * hxy])
    image[_ellipsoid_radius(axes, aorta_c, [np.inf, 0.09 * hxy, 0.09 * hxy]) < 1] = rng.uniform(35, 60)
    cava_c = spine_c + np.array([0, -0.28 * hxy, -0.25 * hxy])
    image[_ellipsoid_radius(axes, cava_c, [np.inf, 0.07 * hxy, 0.1 * hxy]) < 1] = rng.uniform(30, 55)

    # Solid organs at the edges of the field of view: liver on one side, kidneys behind.
    liver_c = np.array([rng.uniform(-0.3, 0.3) * h[0], -rng.uniform(0.0, 0.2) * h[1], -rng.uniform(1.2, 1.3) * h[2]])
    liver = _ellipsoid_radius(axes, liver_c, h * rng.uniform(0.5, 0.6, 3)) + 0.05 * coarse < 1
    image[liver & body] = (rng.uniform(50, 70) + 8 * coarse)[liver & body]
    for side in (-1, 1):
        kidney_c = spine_c + np.array([rng.uniform(-0.3, 0.3) * h[0], -0.05 * h[1],
                                       side * rng.uniform(0.5, 0.6) * hxy])
        kidney_radii = [0.5 * h[0], 0.18 * hxy, 0.13 * hxy]
        kidney = _ellipsoid_radius(axes, kidney_c, kidney_radii, _random_rotation(rng, 0.4)) < 1
        image[kidney] = rng.uniform(25, 45)

    # Bowel loops of organ-like HU, some with gas; the first hugs the pancreatic head (duodenum).
    head = keypoints[0]
    for i in range(rng.integers(6, 11)):
        r = hxy * rng.uniform(0.12, 0.24, 3) * np.array([h[0] / hxy, 1, 1])
        if i == 0:
            c = head + np.array([0, 0, -1]) * (0.3 * hxy + r[2]) * rng.uniform(0.9, 1.1)
        else:
            c = rng.uniform(-0.85, 0.85, 3) * h * np.array([1, 0.55, 1]) - np.array([0, 0.35 * h[1], 0])
        loop_r = _ellipsoid_radius(axes, c, r, _random_rotation(rng, 0.6)) + 0.1 * coarse
        image[loop_r < 1] = (rng.uniform(20, 80) + 12 * coarse)[loop_r < 1]
        if rng.random() < 0.4:
            gas = _ellipsoid_radius(axes, c - np.array([0, 0.4 * r[1], 0]), r * 0.45) < 1
            image[gas] = rng.uniform(-950, -750)
    return image


def _pancreas_case(rng: np.random.Generator, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """One CT-like pancreas case: (int16 HU image, uint8 label), both (z, y, x)."""
    axes = grid.axes()
    fine = _smooth_noise(rng, grid, 1.6)   # lobules, parenchymal texture
    coarse = _smooth_noise(rng, grid, 5.0)  # slow tissue variation
    label, keypoints = _pancreas_mask(rng, grid, axes, fine)
    image = _paint_abdomen(rng, grid, axes, coarse, keypoints)

    # Splenic vein along the back of the gland: organ-like HU, touching but outside the label.
    head, bend, tail = keypoints
    hxy = grid.half[1:].min()
    back = np.array([0, 0.22 * hxy, 0])  # +y is posterior, towards the spine
    vein = _bezier(head + back, bend + back * 1.3, tail + back, 0.4 * min(grid.spacing))
    vein_r = 0.045 * hxy + 0.8  # stays about a voxel wide at toy sizes
    vein_mask = _tubes_distance(grid, [vein], [np.full(len(vein), vein_r)]) < 0
    image[vein_mask & ~label] = rng.uniform(35, 55)

    organ = rng.uniform(45, 90) + 12 * fine + 6 * coarse
    clefts = fine > 1.3  # fat between lobules lowers parts of the gland
    image[label] = (organ - 45 * clefts)[label]

    image = ndimage.gaussian_filter(image, sigma=(0.3, 0.7, 0.7))  # partial volume, thicker in z
    noise = ndimage.gaussian_filter(rng.standard_normal(grid.shape, dtype=np.float32), (0, 0.7, 0.7))
    image = image + rng.uniform(10, 18) * noise / noise.std()  # in-plane correlated CT noise
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), label.astype(np.uint8)


# ----------------------------------------------------------------------------- writing

@dataclass(frozen=True)
class _DatasetSpec:
    name: str
    id_prefix: str
    channel: str
    labels: dict
    builder: Callable[[np.random.Generator, _Grid], tuple[np.ndarray, np.ndarray]]
    key: int  # distinguishes the datasets' random streams


_SPECS = {
    "DemoLA": _DatasetSpec("DemoLA", "demola", "MRI", {"background": 0, "left_atrium": 1}, _la_case, 0),
    "DemoPancreas": _DatasetSpec("DemoPancreas", "demopancreas", "CT", {"background": 0, "pancreas": 1},
                                 _pancreas_case, 1),
}


@dataclass(frozen=True)
class _CaseTask:
    dataset: str
    split: str
    index: int
    folder: Path
    shape_xyz: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    seed: int

    @property
    def case_id(self) -> str:
        tag = _SPLITS[self.split][0]
        return f"{_SPECS[self.dataset].id_prefix}_{tag}{self.index:03d}"


def _write_case(task: _CaseTask) -> str:
    """Generate one case from its own seeded generator and write image (and label)."""
    spec = _SPECS[task.dataset]
    _, images_dir, labels_dir, split_key = _SPLITS[task.split]
    rng = np.random.default_rng([task.seed, spec.key, split_key, task.index])
    grid = _Grid(tuple(reversed(task.shape_xyz)), tuple(reversed(task.spacing_xyz)))
    # Origin of the first voxel centre: the volume centred near the scanner origin, randomly shifted.
    origin = -grid.half[::-1] + np.array(task.spacing_xyz) / 2 + rng.uniform(-20, 20, 3)
    geometry = Geometry(tuple(task.spacing_xyz), tuple(float(o) for o in origin), (1., 0., 0., 0., 1., 0., 0., 0., 1.))
    image, label = spec.builder(rng, grid)
    write_image(image, geometry, task.folder / images_dir / f"{task.case_id}_0000{FILE_ENDING}")
    if labels_dir is not None:
        write_image(label, geometry, task.folder / labels_dir / f"{task.case_id}{FILE_ENDING}")
    return task.case_id


def _dataset_tasks(name: str, folder: Path, config: SyntheticConfig) -> list[_CaseTask]:
    if name == "DemoLA":
        shape, spacing = tuple(config.shape_la), (float(config.spacing_la),) * 3
    else:
        shape, spacing = tuple(config.shape_pancreas), PANCREAS_SPACING
    counts = {"labeled": config.num_labeled, "unlabeled": config.num_unlabeled, "test": config.num_test}
    return [_CaseTask(name, split, i, folder, shape, spacing, config.seed)
            for split, count in counts.items() for i in range(count)]


def _build_dataset(name: str, folder: Path, config: SyntheticConfig, show_progress: bool,
                   num_processes: int) -> None:
    """Write all cases and dataset.json of one dataset into ``folder``."""
    spec = _SPECS[name]
    tasks = _dataset_tasks(name, folder, config)
    map_with_progress(_write_case, tasks, num_processes, desc=f"synthesising {name}", show_progress=show_progress)
    labeled_ids = [t.case_id for t in tasks if t.split == "labeled"]
    write_dataset_json(folder, [spec.channel], spec.labels, num_training=len(labeled_ids),
                       file_ending=FILE_ENDING, case_order=labeled_ids,
                       description=f"synthetic demo dataset (versemi.datasets.synthetic, seed {config.seed})",
                       numUnlabeled=config.num_unlabeled, numTest=config.num_test)


def _validate(config: SyntheticConfig, output_root: Path) -> None:
    where = f"{output_root} (SyntheticConfig)"
    if config.num_labeled < 1 or config.num_unlabeled < 0 or config.num_test < 0:
        raise input_error(where, f"case counts {config.num_labeled} labeled / {config.num_unlabeled} unlabeled / "
                                 f"{config.num_test} test are invalid",
                          "use at least 1 labeled case and non-negative unlabeled and test counts")
    for field_name in ("shape_la", "shape_pancreas"):
        shape = tuple(getattr(config, field_name))
        if len(shape) != 3 or min(shape) < MIN_SHAPE:
            raise input_error(where, f"{field_name} {shape} is not three sizes of at least {MIN_SHAPE} voxels",
                              f"give (x, y, z) sizes >= {MIN_SHAPE}, e.g. (64, 64, 64)")
    if not config.spacing_la > 0:
        raise input_error(where, f"spacing_la {config.spacing_la} is not positive", "give a spacing in mm, e.g. 1.0")
    if config.seed < 0:
        raise input_error(where, f"seed {config.seed} is negative", "use a seed >= 0")


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse to replace an existing non-empty dataset folder unless asked to."""
    if not (target.exists() or target.is_symlink()) or overwrite:
        return
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return
    raise input_error(target, "already exists and is not empty",
                      "pass overwrite=True (--overwrite) to replace it, or choose another output folder")


def _move_into_place(built: Path, target: Path) -> None:
    """Swap the finished folder in; the old one is removed only now, right before the rename."""
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    os.replace(built, target)


def make_synthetic(output_root: str | Path, config: SyntheticConfig | None = None, *, overwrite: bool = False,
                   show_progress: bool = True, num_processes: int = 1) -> list[Path]:
    """Write ``output_root/DemoLA`` and ``output_root/DemoPancreas`` in the raw layout.

    Each dataset is built in a hidden sibling folder and renamed into place when complete, so an
    interrupted run never leaves a half-written dataset. Existing non-empty dataset folders are an
    InputError unless ``overwrite``; both are checked before anything is written.
    Returns the dataset folders.
    """
    config = SyntheticConfig() if config is None else config
    output_root = Path(output_root)
    _validate(config, output_root)
    targets = [output_root / name for name in DEMO_DATASETS]
    for target in targets:
        _check_target(target, overwrite)
    output_root.mkdir(parents=True, exist_ok=True)
    for name, target in zip(DEMO_DATASETS, targets):
        building = output_root / f".{name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
        building.mkdir()
        try:
            _build_dataset(name, building, config, show_progress, num_processes)
            _move_into_place(building, target)
        finally:
            if building.exists():
                shutil.rmtree(building, ignore_errors=True)
    return targets
