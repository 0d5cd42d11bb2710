"""The preprocessing cache: every training case cropped, normalized and resampled, on disk.

Layout, per experiment and configuration::

    <plans root>/<experiment>/<configuration>/<Dataset>/<case>_data.b2nd   float32 (c, z, y, x)
                                                      /<case>_seg.b2nd    int8 (1, z, y, x), labeled cases only
                                                      /<case>.json        properties (written last)
                                             /<Dataset>@<Other>/...       the dataset's cases prepared by
                                                                          another dataset's plan (no labels)

The ``Dataset@Other`` folders exist where a dataset declares another's structures absent and
the two plans prepare images differently (``model.absent_views``): training learns the absence on
the view prediction shows that structure's prompt.

Arrays are blosc2 (zstd) files, which the data loader can read patch by patch without
decompressing the whole case. The JSON is written last and records the size and CRC32 of each
array file plus a digest of the dataset's preprocessing settings, so a rerun redoes exactly the
cases that are missing, damaged, or were made with other settings (e.g. after a kill).
"""
from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import blosc2
import numpy as np

from ..atomic import atomic_path, read_json, write_json
from ..datasets.io import read_image, read_label
from ..datasets.layout import RawCase, RawDataset
from ..locks import folder_lock
from ..model.plans_view import DEFAULT_CONFIGURATION, PlansView
from ..parallel import map_with_progress
from ..model.absent_views import cached_view_pairs, plan_of_folder, view_folder
from .cropping import crop
from .pipeline import to_network_input
from .resampling import concrete_target, resample_segmentation

CACHE_VERSION = 1
MAX_LOCATIONS_PER_LABEL = 2_000  # foreground patch centres kept per label for oversampling
CPARAMS = {"codec": blosc2.Codec.ZSTD, "clevel": 3}


@dataclass(frozen=True)
class CaseJob:
    dataset: str
    case: RawCase
    labeled: bool
    seed: int
    shown_as: str | None = None  # another dataset whose plan prepares the case (a view, ``Dataset@Other``)

    @property
    def folder(self) -> str:
        return view_folder(self.dataset, self.shown_as) if self.shown_as else self.dataset


def cache_folder(plans_root: Path, experiment: str, configuration: str) -> Path:
    return plans_root / experiment / configuration


def settings_digest(dataset_plan: dict) -> str:
    """Digest of everything that changes a dataset's cached arrays."""
    relevant = {k: dataset_plan[k] for k in ("target_spacing", "normalization", "labels")}
    relevant["cache_version"] = CACHE_VERSION
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def file_checksum(path: Path) -> dict:
    data = path.read_bytes()
    return {"bytes": len(data), "crc32": zlib.crc32(data)}


def source_stamp(case: RawCase) -> list[list]:
    """Name, size and modification time of the raw files a case was made from."""
    files = case.images + ([case.label] if case.label is not None else [])
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def case_is_complete(properties_path: Path, digest: str, case: RawCase) -> bool:
    """True when the case's JSON, arrays and checksums are intact and made with ``digest``
    from the raw files as they are now."""
    try:
        props = read_json(properties_path)
        if props.get("settings_digest") != digest or props.get("source_stamp") != source_stamp(case):
            return False
        for entry in props["files"].values():
            if file_checksum(properties_path.parent / entry["name"]) != entry["checksum"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def sample_class_locations(seg: np.ndarray, rng: np.random.Generator) -> dict[str, list[list[int]]]:
    """Up to MAX_LOCATIONS_PER_LABEL voxel coordinates (z, y, x) per foreground label."""
    locations = {}
    for value in np.unique(seg):
        if value == 0:
            continue
        coords = np.argwhere(seg == value)
        if len(coords) > MAX_LOCATIONS_PER_LABEL:
            coords = coords[np.sort(rng.choice(len(coords), MAX_LOCATIONS_PER_LABEL, replace=False))]
        locations[str(int(value))] = coords.tolist()
    return locations


def write_array(array: np.ndarray, path: Path) -> dict:
    """Write a blosc2 array atomically; return its checksum entry."""
    with atomic_path(path, suffix=".b2nd") as tmp:
        tmp.unlink()  # blosc2 refuses to write over an existing file
        blosc2.asarray(np.ascontiguousarray(array), urlpath=str(tmp), mode="w", cparams=CPARAMS)
    return {"name": path.name, "checksum": file_checksum(path)}


def read_array(path: Path) -> np.ndarray:
    return blosc2.open(str(path), mode="r")[:]


def preprocess_case(job: CaseJob, dataset_plan: dict, folder: Path, digest: str) -> dict:
    """Crop, normalize, resample (``pipeline.to_network_input``, as prediction does) and write one case; returns its properties."""
    case = job.case
    image, geometry = read_image(case.images)
    image, cropped = to_network_input(image, geometry.spacing_zyx, dataset_plan)
    target = dataset_plan["target_spacing"]
    target = concrete_target(geometry.spacing_zyx, target)  # the case's own spacing along a null axis
    files = {"data": write_array(image, folder / f"{case.case_id}_data.b2nd")}
    props = {
        "dataset": job.dataset,
        **({"shown_as": job.shown_as} if job.shown_as else {}),
        "case_id": case.case_id,
        "labeled": job.labeled,
        "original_shape": list(cropped.full_shape),
        "original_geometry": geometry.to_dict(),
        "original_spacing_zyx": list(geometry.spacing_zyx),
        "crop_bbox": cropped.bbox,
        "shape_after_crop": list(cropped.shape),
        "spacing": target,
        "shape": list(image.shape[1:]),
    }
    if job.labeled:
        label, _ = read_label(case.label)
        seg = resample_segmentation(crop(label, cropped.bbox), geometry.spacing_zyx, target).astype(np.int8)
        files["seg"] = write_array(seg[None], folder / f"{case.case_id}_seg.b2nd")
        props["class_locations"] = sample_class_locations(seg, np.random.default_rng(job.seed))
    props["files"] = files
    props["settings_digest"] = digest
    props["source_stamp"] = source_stamp(case)
    write_json(props, folder / f"{case.case_id}.json")
    return {"case": f"{job.folder}/{case.case_id}", "shape": props["shape"]}


def _run_job(job: CaseJob, plans: dict, configuration: str, root: Path, digests: dict[str, str]) -> dict:
    return preprocess_case(job, PlansView(plans).dataset_plan(plan_of_folder(job.folder), configuration),
                           root / job.folder, digests[job.folder])


def remove_partial_files(root: Path) -> int:
    """Delete temporary files a killed run left behind; returns how many."""
    leftovers = list(root.rglob("*.partial*")) if root.is_dir() else []
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


def preprocess_experiment(plans: dict, datasets: dict[str, RawDataset], plans_root: Path,
                          configuration: str = DEFAULT_CONFIGURATION, num_processes: int = 2,
                          show_progress: bool = True) -> dict:
    """Bring the experiment's cache up to date; returns counts of cases done and skipped."""
    root = cache_folder(plans_root, plans["experiment"], configuration)
    # one run fills a cache at a time: it removes temporary files, which another run may be writing
    with folder_lock(root, "preprocessing"):
        return _fill_cache(plans, datasets, configuration, root, num_processes, show_progress)


def configuration_digests(plans: dict, configuration: str) -> dict[str, str]:
    """Per cache folder (each dataset, each view ``Dataset@Other``), the digest its cached cases of
    ``configuration`` must carry: that of the plan that prepared them."""
    view = PlansView(plans)
    own = {name: settings_digest(view.dataset_plan(name, configuration)) for name in plans["datasets"]}
    return {**own, **{view_folder(d, e): own[e] for d, e in cached_view_pairs(plans, configuration)}}


def _fill_cache(plans: dict, datasets: dict[str, RawDataset], configuration: str, root: Path, num_processes: int,
                show_progress: bool) -> dict:
    remove_partial_files(root)
    digests = configuration_digests(plans, configuration)
    jobs, skipped = [], 0
    for name, plan in plans["datasets"].items():
        raw = datasets[name]
        by_id = {c.case_id: c for c in raw.labeled_cases() + raw.unlabeled_cases()}
        labeled = set(plan["labeled_cases"])
        views = [other for d, other in cached_view_pairs(plans, configuration) if d == name]
        for index, case_id in enumerate(plan["labeled_cases"] + plan["unlabeled_cases"]):
            case = by_id[case_id] if case_id in labeled else RawCase(case_id, by_id[case_id].images)
            # the case itself, then its views: the image only, as another dataset's plan prepares it
            for job in [CaseJob(name, case, case_id in labeled, seed=index)] + \
                       [CaseJob(name, RawCase(case_id, case.images), False, index, other) for other in views]:
                if case_is_complete(root / job.folder / f"{case_id}.json", digests[job.folder], job.case):
                    skipped += 1
                    continue
                jobs.append(job)
    work = partial(_run_job, plans=plans, configuration=configuration, root=root, digests=digests)
    done = map_with_progress(work, jobs, num_processes, f"preprocess {plans['experiment']}", show_progress)
    return {"preprocessed": len(done), "already_cached": skipped, "folder": str(root)}
