"""The joint experiment plan: per-dataset spacing and normalization, one shared network.

Datasets planned together share the backbone, batch size, network topology and prompt table;
each keeps its own target spacing and intensity normalization. They share one patch size (in
voxels) too; with ``PlanSettings.patch_per_dataset`` a dataset whose images are smaller than it
gets its own patch, the shared one capped by its median shape (``dataset_patch_sizes``), as
nnU-Net caps a single dataset's patch, so its small images are not padded several times over. The plan is written as readable JSON to
``<plans root>/<experiment>/plans.json``; README.md documents every field.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import __version__
from .fingerprint import intensity_statistics
from .topology import MIN_FEATURE_MAP_SIZE, Topology, plan_batch_size, plan_patch_and_topology, pool_and_conv_props

PLANS_VERSION = 1
NUM_FOLDS = 5
SPLIT_SEED = 12345
ANISOTROPY_RATIO = 3.0  # nnU-Net: an axis this much coarser than the others is "anisotropic"
CONFIGURATION = "3d_fullres"
CONFIGURATION_2D = "2d"


@dataclass
class PlanSettings:
    memory_gb: float = 8.0
    architecture: str = "unet"
    # > 1 plans at a coarser spacing (e.g. 2 = half resolution) for quick CPU runs: one factor for
    # every dataset, or one per dataset name (a dataset not named keeps 1)
    spacing_scale: float | dict[str, float] = 1.0
    # a dataset of smaller images gets a patch of its own (``dataset_patch_sizes``); off by default:
    # its batches then hold one dataset each, and joint runs with the default SGD stalled (RESULTS.md)
    patch_per_dataset: bool = False
    # a patch chosen by the user per configuration ("2d": [y, x], "3d_fullres": [z, y, x]) instead of
    # the one capped by the median image: for objects larger than the median image's extent (a late
    # fetal head in a zoomed-out ultrasound), which a patch of the median extent never shows whole
    patch_size: dict[str, list[int]] = field(default_factory=dict)

    def scale_of(self, dataset: str) -> float:
        if isinstance(self.spacing_scale, dict):
            return float(self.spacing_scale.get(dataset, 1.0))
        return float(self.spacing_scale)


def patch_size_problems(patch_size: dict[str, list[int]]) -> list[str]:
    """What is wrong with user-chosen patches (``PlanSettings.patch_size``), one line each."""
    axes = {CONFIGURATION: 3, CONFIGURATION_2D: 2}
    problems = []
    for configuration, patch in patch_size.items():
        if configuration not in axes:
            problems.append(f"{configuration!r} is no configuration (choose {' or '.join(axes)})")
        elif len(patch) != axes[configuration]:
            problems.append(f"a {configuration} patch has {axes[configuration]} axes, got {len(patch)}")
        elif min(patch) < 2 * MIN_FEATURE_MAP_SIZE:
            problems.append(f"every axis of a patch needs at least {2 * MIN_FEATURE_MAP_SIZE} voxels, got {list(patch)}")
    return problems


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[list[float], int | None]:
    """Median spacing; an anisotropic axis takes its 10th percentile instead (nnU-Net's rule).

    Returns (spacing in (z, y, x), index of the anisotropic axis or None).
    """
    target = np.percentile(spacings, 50, axis=0)
    median_shape = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    aniso_spacing = target[worst] > ANISOTROPY_RATIO * max(target[others])
    aniso_voxels = median_shape[worst] * ANISOTROPY_RATIO < min(median_shape[others])
    if not (aniso_spacing and aniso_voxels):
        return [float(s) for s in target], None
    along = np.percentile(spacings[:, worst], 10)
    if along < max(target[others]):
        along = max(max(target[others]), along) + 1e-5
    target[worst] = along
    return [float(s) for s in target], worst


def normalization_plan(fingerprint: dict, is_ct: bool, labeled_ids: list[str], stored_samples: dict,
                       uses_all_labels: bool) -> list[dict]:
    """Per channel: CT clip + dataset z-score, else per-image z-score (masked if cropping shrank a lot)."""
    channels = fingerprint["channel_names"]
    plan = []
    for c, name in enumerate(channels):
        if is_ct and name.strip().lower() == "ct":
            if uses_all_labels:
                stats = fingerprint["foreground_intensity_properties_per_channel"][str(c)]
                source = "all labeled cases"
            else:
                # only the experiment's labeled cases may inform it: the others act as unlabeled
                pooled = np.concatenate([stored_samples[cid][c] for cid in labeled_ids if cid in stored_samples])
                stats = intensity_statistics(pooled)
                source = f"the {len(labeled_ids)} labeled cases of this experiment"
            plan.append({"channel": name, "scheme": "ct", "clip": [stats["percentile_00_5"], stats["percentile_99_5"]],
                         "mean": stats["mean"], "std": stats["std"], "statistics_from": source})
        else:
            # nnU-Net normalizes inside the nonzero mask when cropping removed a quarter or more
            masked = fingerprint["median_relative_size_after_cropping"] < 0.75
            plan.append({"channel": name, "scheme": "zscore", "use_nonzero_mask": bool(masked)})
    return plan


def plan_dataset(fingerprint: dict, is_ct: bool, labeled_limit: int | None, case_order: list[str],
                 stored_samples: dict, spacing_scale: float = 1.0) -> dict:
    """Target spacing, normalization and resampled median shape of one dataset in the experiment."""
    spacings = np.array(fingerprint["spacings"], dtype=float)
    shapes = np.array(fingerprint["shapes_after_crop"], dtype=float)
    spacing, aniso_axis = target_spacing(spacings, shapes)
    spacing = [s * spacing_scale for s in spacing]
    # at least one voxel per axis, as the preprocessing resamples: a coarse --spacing-scale must not
    # turn a single image's one slice into none (the dataset's voxels then cap the 2d batch at 2)
    resampled = np.maximum(np.round(shapes * spacings / np.array(spacing)), 1)
    labeled = [c["case_id"] for c in fingerprint["cases"] if c["labeled"]]
    ordered = [cid for cid in case_order if cid in labeled] + sorted(set(labeled) - set(case_order))
    kept = ordered if labeled_limit is None else ordered[:labeled_limit]
    return {
        "channel_names": fingerprint["channel_names"],
        "labels": fingerprint["labels"],
        "modality": "CT" if is_ct else "other",
        "target_spacing": spacing,
        "anisotropic_axis": aniso_axis,
        "median_shape_after_resampling": [int(v) for v in np.median(resampled, axis=0)],
        "normalization": normalization_plan(fingerprint, is_ct, kept, stored_samples, labeled_limit is None),
        "labeled_limit": labeled_limit,
        "labeled_cases": kept,
        "unlabeled_cases": [c["case_id"] for c in fingerprint["cases"] if c["case_id"] not in kept],
    }


def prompt_table(dataset_plans: dict[str, dict]) -> list[dict]:
    """One prompt per (dataset, foreground label), then the synthetic prompt last."""
    prompts = []
    for name, plan in dataset_plans.items():
        for label_name, value in sorted(plan["labels"].items(), key=lambda kv: kv[1]):
            if value != 0:
                prompts.append({"index": len(prompts), "dataset": name, "label": label_name, "label_value": value})
    prompts.append({"index": len(prompts), "dataset": None, "label": "synthetic", "label_value": None})
    return prompts


def cross_validation_splits(dataset_plans: dict[str, dict], seed: int = SPLIT_SEED) -> list[dict]:
    """5 folds over labeled cases, stratified by dataset; unlabeled cases are always in training.

    Case keys are ``Dataset/case_id``. Each dataset's labeled cases are shuffled with ``seed`` and
    dealt round-robin to the folds, so every fold gets a share of every dataset. Cases that share a
    group (``case_groups``: the images of one subject) are dealt together, so no subject has labeled
    images on both sides of a fold; the group takes the place of its first case in the shuffled
    order. Without groups every case is a group of one: plain round-robin over the cases.
    """
    folds = [{"train_labeled": [], "val": [], "train_unlabeled": []} for _ in range(NUM_FOLDS)]
    for name, plan in dataset_plans.items():
        cases = plan["labeled_cases"]
        case_groups = plan.get("case_groups", {})
        groups: dict[tuple[str, str], list[str]] = {}
        for index in np.random.default_rng(seed).permutation(len(cases)):
            cid = cases[index]
            group = ("group", case_groups[cid]) if cid in case_groups else ("case", cid)
            groups.setdefault(group, []).append(f"{name}/{cid}")
        for position, keys in enumerate(groups.values()):
            for fold_index, fold in enumerate(folds):
                target = "val" if position % NUM_FOLDS == fold_index else "train_labeled"
                fold[target].extend(keys)
        for fold in folds:
            fold["train_unlabeled"].extend(f"{name}/{cid}" for cid in plan["unlabeled_cases"])
    for fold in folds:
        for key in fold:
            fold[key].sort()
    return folds


def is_native_2d(fingerprint: dict) -> bool:
    """Every image of the dataset is a single slice (PNG, or a one-slice volume)."""
    return all(int(shape[0]) == 1 for shape in fingerprint["shapes_after_crop"])


def _dataset_voxels(datasets: dict[str, dict]) -> float:
    return sum(np.prod(d["median_shape_after_resampling"]) * (len(d["labeled_cases"]) + len(d["unlabeled_cases"]))
               for d in datasets.values())


def dataset_patch_sizes(datasets: dict[str, dict], topology: Topology) -> dict[str, list[int]]:
    """Per dataset of a joint plan whose median image is smaller than the shared patch along some
    axis: the shared patch capped by that median shape, rounded up to the network's downsampling
    (so the network takes it). Datasets that fill the shared patch are not listed; a one-dataset
    plan lists none (its patch is already capped by its own median shape)."""
    if len(datasets) < 2:
        return {}
    divisor, patch = np.array(topology.divisor), np.array(topology.patch_size)
    sizes = {}
    for name, plan in datasets.items():
        median = np.array(plan["median_shape_after_resampling"], dtype=float)
        if topology.spatial_dims == 2:
            median[0] = 1  # a 2d patch is one slice
        own = np.minimum(patch, np.maximum(divisor, np.ceil(median / divisor) * divisor)).astype(int)
        if (own < patch).any():
            sizes[name] = [int(v) for v in own]
    return sizes


def plan_3d_configuration(datasets: dict[str, dict], in_channels: int, settings: PlanSettings) -> dict:
    """One 3d patch for all datasets: the topology spacing is the median of their target spacings
    and the patch is capped by the largest median shape, so no dataset is forced into tiny patches."""
    spacing = np.median([d["target_spacing"] for d in datasets.values()], axis=0)
    cap_shape = np.max([d["median_shape_after_resampling"] for d in datasets.values()], axis=0)
    topology = _topology(spacing, cap_shape, in_channels, settings, CONFIGURATION)
    batch_size = plan_batch_size(topology, in_channels, settings.memory_gb, _dataset_voxels(datasets))
    return {
        "data_identifier": CONFIGURATION,
        "patch_size": topology.patch_size,
        **_patch_source(settings, CONFIGURATION),
        **_own_patches(datasets, topology, settings),
        "batch_size": batch_size,
        "topology_spacing": [float(s) for s in spacing],
        "network": topology.network_plan(settings.architecture),
        "cpu_preset": topology.cpu_preset(batch_size),
    }


def plan_2d_configuration(datasets: dict[str, dict], in_channels: int, settings: PlanSettings) -> dict:
    """nnU-Net's 2d configuration: slices (z, the first axis) at the in-plane target spacing,
    never resampled across slices (each case keeps its own slice spacing: ``target_spacing``
    null along z), a 2d patch and batch sized to the memory budget, a 2d topology. Arrays keep
    the (z, y, x) layout: a patch is (1, y, x), strides and kernels are 1 along z."""
    spacing = np.median([d["target_spacing"] for d in datasets.values()], axis=0)[1:]
    cap_shape = np.max([d["median_shape_after_resampling"] for d in datasets.values()], axis=0)[1:]
    topology = _topology(spacing, cap_shape, in_channels, settings, CONFIGURATION_2D).lifted()
    batch_size = plan_batch_size(topology, in_channels, settings.memory_gb, _dataset_voxels(datasets))
    return {
        "data_identifier": CONFIGURATION_2D,
        "spatial_dims": 2,
        "patch_size": topology.patch_size,
        **_patch_source(settings, CONFIGURATION_2D),
        **_own_patches(datasets, topology, settings),
        "batch_size": batch_size,
        "topology_spacing": [float(s) for s in spacing],
        "target_spacing": {name: [None, *d["target_spacing"][1:]] for name, d in datasets.items()},
        # the V-Net exists in 3d only: a 2d configuration always has a U-Net
        "network": topology.network_plan("unet"),
        "cpu_preset": topology.cpu_preset(batch_size),
    }


def structures_beyond_patch(fingerprint: dict, dataset_plan: dict, configuration: str,
                            patch_size: list[int]) -> dict | None:
    """The experiment's labeled cases whose labeled structures span more than the patch along some
    axis (in-plane only in 2d), at the dataset's planned spacing: the network never sees them
    whole, and a structure recognised only by its outline (a fetal head) is then found in part.
    None where the fingerprint does not measure extents (one made by an earlier version)."""
    records = {c["case_id"]: c for c in fingerprint["cases"]}
    spans = [np.array(records[cid]["foreground_extent"], float) * np.array(records[cid]["spacing"], float)
             for cid in dataset_plan["labeled_cases"] if "foreground_extent" in records.get(cid, {})]
    if not spans:
        return None
    axes = [1, 2] if configuration == CONFIGURATION_2D else [0, 1, 2]
    patch_mm = np.array(patch_size, float) * np.array(dataset_plan["target_spacing"], float)
    beyond = sum(bool((span[axes] > patch_mm[axes]).any()) for span in spans)
    return {"cases": int(beyond), "of": len(spans), "patch_mm": [round(float(patch_mm[a]), 1) for a in axes],
            "largest_mm": [round(float(max(span[a] for span in spans)), 1) for a in axes]}


def _topology(spacing, cap_shape, in_channels: int, settings: PlanSettings, configuration: str) -> Topology:
    """The user's patch for the configuration where one was chosen, else the largest the median
    image and the memory budget allow; the network's topology follows the patch either way."""
    chosen = settings.patch_size.get(configuration)
    if chosen:
        return pool_and_conv_props(spacing, chosen)
    return plan_patch_and_topology(spacing, cap_shape, in_channels, settings.memory_gb)


def _patch_source(settings: PlanSettings, configuration: str) -> dict:
    """``{"patch_size_requested": ...}`` where the user chose the patch (the planned one is it, padded
    to the network's downsampling), else nothing."""
    chosen = settings.patch_size.get(configuration)
    return {"patch_size_requested": [int(v) for v in chosen]} if chosen else {}


def _own_patches(datasets: dict[str, dict], topology: Topology, settings: PlanSettings) -> dict:
    """``{"dataset_patch_sizes": ...}`` where asked for and some dataset has its own patch, else nothing."""
    sizes = dataset_patch_sizes(datasets, topology) if settings.patch_per_dataset else {}
    return {"dataset_patch_sizes": sizes} if sizes else {}


def plan_experiment(experiment: str, fingerprints: dict[str, dict], ct_flags: dict[str, bool],
                    labeled_limits: dict[str, int | None], case_orders: dict[str, list[str]],
                    stored_samples: dict[str, dict], settings: PlanSettings = PlanSettings(),
                    known_absent: dict[str, list[str]] | None = None,
                    case_groups: dict[str, dict[str, str] | None] | None = None) -> dict:
    """The whole plan for the datasets of one experiment (see README: "plans.json, field by field").

    ``known_absent``: per dataset, the ``Other/label`` structures declared absent from its images
    (``plans.known_absent``); stored only where something is declared. ``case_groups``: per dataset,
    case id -> group (dataset.json ``case_groups``); stored, for the planned cases, only where given.
    """
    datasets = {name: plan_dataset(fp, ct_flags[name], labeled_limits.get(name), case_orders[name],
                                   stored_samples[name], settings.scale_of(name)) for name, fp in fingerprints.items()}
    for name, absent in (known_absent or {}).items():
        if absent:
            datasets[name]["known_absent"] = list(absent)
    for name, groups in (case_groups or {}).items():
        if groups:
            planned = datasets[name]["labeled_cases"] + datasets[name]["unlabeled_cases"]
            datasets[name]["case_groups"] = {cid: groups[cid] for cid in planned if cid in groups}
    in_channels = len(next(iter(datasets.values()))["channel_names"])
    configurations = {}
    # a dataset of single images (one slice each) gets no 3d network, as in nnU-Net
    if not any(is_native_2d(fp) for fp in fingerprints.values()):
        configurations[CONFIGURATION] = plan_3d_configuration(datasets, in_channels, settings)
    configurations[CONFIGURATION_2D] = plan_2d_configuration(datasets, in_channels, settings)
    for name, configuration in configurations.items():
        beyond = {}
        for dataset in datasets:
            measured = structures_beyond_patch(fingerprints[dataset], datasets[dataset], name, configuration["patch_size"])
            if measured:
                beyond[dataset] = measured
        if beyond:
            configuration["structures_beyond_patch"] = beyond
    prompts = prompt_table(datasets)
    return {
        "plans_version": PLANS_VERSION,
        "versemi_version": __version__,
        "experiment": experiment,
        "dataset_names": list(datasets),
        "datasets": datasets,
        "in_channels": in_channels,
        "prompts": prompts,
        "num_prompts": len(prompts),
        "synthetic_prompt": len(prompts) - 1,
        "memory_budget_gb": settings.memory_gb,
        "configurations": configurations,
        "splits": {"seed": SPLIT_SEED, "folds": cross_validation_splits(datasets)},
    }
