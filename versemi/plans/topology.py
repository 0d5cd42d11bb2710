"""Network topology and patch size from spacing and shape, following nnU-Net v2's planner.

``pool_and_conv_props`` is nnU-Net's ``get_pool_and_conv_props``: pool an axis only while its
feature map stays >= 2 x ``min_feature_map_size`` and its spacing is within 2x of the finest;
use 1-wide kernels along an axis until its spacing has caught up (anisotropic data).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_FEATURE_MAP_SIZE = 4
BASE_FEATURES, MAX_FEATURES = 32, 320
MAX_FEATURES_2D = 512  # nnU-Net's 2d networks go up to 512 features, its 3d ones to 320
CPU_FEATURE_DIVISOR, CPU_MIN_FEATURES, CPU_MAX_BATCH = 4, 8, 4  # the plan's CPU preset (Topology.cpu_preset)
# a 2d sample costs a small fraction of a 3d one: the CPU preset keeps more of them per batch
CPU_MAX_BATCH_2D = 12
MAX_STAGES = 6
MAX_STAGES_2D = 7
# Reference: nnU-Net's default 3d_fullres network (128^3 patch, 6 stages 32..320, batch 2) fits an
# 8 GB GPU; ``estimate_memory`` is scaled so that this network costs exactly 8 GB.
REFERENCE_BUDGET_GB = 8.0


@dataclass
class Topology:
    patch_size: list[int]
    strides: list[list[int]]       # per stage, stage 0 is [1, 1, 1]
    kernel_sizes: list[list[int]]  # per stage
    features: list[int]
    spatial_dims: int = 3  # 2: a 2d network, stored with a leading slice axis of size 1 (``lifted``)

    @property
    def divisor(self) -> list[int]:
        return [int(np.prod([s[a] for s in self.strides])) for a in range(len(self.patch_size))]

    def cpu_preset(self, batch_size: int) -> dict:
        """The network size a CPU trains to a plateau within about 30 minutes (``--network-size``):
        a quarter of the features per stage and at most 4 patches per batch. Measured on real
        hippocampus MRI (benchmarks/RESULTS.md): one step of 8-16-32-64 with batch 4 costs 1.11 s
        against 2.94 s for 16-32-64-128 (fp32, one thread), and 20 minutes reach a test Dice of 80."""
        return {"features": [max(CPU_MIN_FEATURES, f // CPU_FEATURE_DIVISOR) for f in self.features],
                "batch_size": min(batch_size, CPU_MAX_BATCH_2D if self.spatial_dims == 2 else CPU_MAX_BATCH)}

    def network_plan(self, architecture: str = "unet") -> dict:
        plan = {"architecture": architecture, "features": self.features, "kernel_sizes": self.kernel_sizes,
                "strides": self.strides, "norm": "instance", "context_norm": "group",
                "head_activation": "leaky_relu", "deep_supervision": False}
        if self.spatial_dims == 2:
            plan["spatial_dims"] = 2
        return plan

    def lifted(self) -> "Topology":
        """A 2d topology in the (z, y, x) layout every array of the pipeline has: a slice axis of
        size 1 in front, stride and kernel 1 along it. A 2d patch is then one slice of a volume."""
        return Topology([1, *self.patch_size], [[1, *s] for s in self.strides], [[1, *k] for k in self.kernel_sizes],
                        self.features, spatial_dims=2)


def pool_and_conv_props(spacing, patch_size, max_stages: int | None = None) -> Topology:
    """nnU-Net's pooling/kernel schedule for a 3D or 2D patch; the patch is padded to be divisible."""
    dim = len(spacing)
    max_stages = max_stages or (MAX_STAGES_2D if dim == 2 else MAX_STAGES)
    current_spacing, current_size = list(map(float, spacing)), list(map(float, patch_size))
    strides, kernels = [[1] * dim], []
    kernel = [1] * dim
    while len(strides) < max_stages:
        valid = [a for a in range(dim) if current_size[a] >= 2 * MIN_FEATURE_MAP_SIZE]
        if not valid:
            break
        finest = min(current_spacing[a] for a in valid)
        valid = [a for a in valid if current_spacing[a] / finest < 2]
        if len(valid) == 1 and current_size[valid[0]] < 3 * MIN_FEATURE_MAP_SIZE:
            break
        for a in range(dim):
            if kernel[a] != 3 and current_spacing[a] / min(current_spacing) < 2:
                kernel[a] = 3
        stride = [2 if a in valid else 1 for a in range(dim)]
        for a in valid:
            current_spacing[a] *= 2
            current_size[a] = np.ceil(current_size[a] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)  # the bottleneck always uses full 3x3x3 kernels
    divisor = [int(np.prod([s[a] for s in strides])) for a in range(dim)]
    padded = [int(np.ceil(p / d) * d) for p, d in zip(patch_size, divisor)]
    features = [min(BASE_FEATURES * 2 ** i, MAX_FEATURES_2D if dim == 2 else MAX_FEATURES) for i in range(len(strides))]
    return Topology(padded, strides, kernels, features)


def topology_for_patch(spacing, patch_size, spatial_dims: int = 3) -> Topology:
    """The topology of a configuration for a given (z, y, x) patch: 3d as planned, 2d from the
    in-plane axes (``spacing`` then holds the in-plane spacing only, the patch's slice axis is 1)."""
    if spatial_dims == 3:
        return pool_and_conv_props(spacing, patch_size)
    if len(patch_size) != 3 or int(patch_size[0]) != 1:
        raise ValueError(f"a 2d patch is one slice, (1, y, x); got {list(patch_size)}")
    return pool_and_conv_props(list(spacing)[-2:], list(patch_size)[1:]).lifted()


def estimate_memory(topology: Topology, in_channels: int, batch_size: int) -> float:
    """Relative training memory: feature-map voxels over encoder and decoder (2 convs each)."""
    size = np.array(topology.patch_size, dtype=float)
    total = in_channels * np.prod(size)
    for stage, (stride, features) in enumerate(zip(topology.strides, topology.features)):
        size = np.ceil(size / np.array(stride))
        convs = 2 if stage == len(topology.strides) - 1 else 4  # bottleneck only once
        total += convs * features * np.prod(size)
    return float(total * batch_size)


def _reference_cost() -> float:
    reference = pool_and_conv_props([1.0, 1.0, 1.0], [128, 128, 128])
    return estimate_memory(reference, 1, 2)


def plan_patch_and_topology(spacing, median_shape, in_channels: int, memory_gb: float) -> Topology:
    """Largest nnU-Net-style patch (aspect from spacing, capped by the median shape) fitting the budget."""
    spacing = np.asarray(spacing, dtype=float)
    median_shape = np.asarray(median_shape, dtype=float)
    inverse = 1.0 / spacing
    dim = len(spacing)
    # nnU-Net's starting patch: 256^3 voxels in 3d, 2048^2 pixels in 2d, shaped like the spacing
    start = 256 ** 3 if dim == 3 else 2048 ** 2
    initial = inverse * (start / np.prod(inverse)) ** (1 / dim)
    patch = np.minimum(np.round(initial), median_shape).astype(int)
    topology = pool_and_conv_props(spacing, patch)
    budget = _reference_cost() * memory_gb / REFERENCE_BUDGET_GB
    reference_batch = 2 if dim == 3 else 12  # nnU-Net sizes 3d patches for batch 2, 2d ones for batch 12
    while estimate_memory(topology, in_channels, reference_batch) > budget:
        # shrink the axis that is largest relative to the median shape, by one divisor step
        ratios = np.array(topology.patch_size) / median_shape
        axis = int(np.argmax(ratios))
        patch = np.array(topology.patch_size)
        patch[axis] -= topology.divisor[axis]
        if patch[axis] < MIN_FEATURE_MAP_SIZE:
            break
        topology = pool_and_conv_props(spacing, patch)
    return topology


def plan_batch_size(topology: Topology, in_channels: int, memory_gb: float, dataset_voxels: float) -> int:
    """nnU-Net's rule: fill the budget, at least 2, covering at most 5 % of the dataset's voxels."""
    budget = _reference_cost() * memory_gb / REFERENCE_BUDGET_GB
    per_sample = estimate_memory(topology, in_channels, 1)
    batch = int(np.floor(budget / per_sample))
    cap = int(np.floor(0.05 * dataset_voxels / np.prod(topology.patch_size)))
    return int(max(2, min(batch, cap)))
