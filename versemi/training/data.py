"""Training batches from the preprocessing cache.

``CaseStore`` opens cached cases (checking that the cache matches the plan); ``BatchSource``
builds batch number ``i`` of a stream as a pure function of (seed, stream, i): datasets are
drawn uniformly (balanced across datasets), then a case, then a patch (a share of them centred
on a foreground voxel), then augmentation. Where datasets of a joint plan have patches of their
own (``dataset_patch_sizes``), a batch of one dataset holds one shape, and a batch of a smaller
patch holds more patches: as many voxels as a batch of the shared patch (as nnU-Net sizes a batch
to its patch). Two ways to step with them (``dataset_batches``):
- ``"each"`` (training's default, ``--dataset-batches``): item ``i`` holds one such batch per dataset of the plan
  (``{"sub_batches": [...]}``, in the plan's order), and the trainer accumulates their gradients
  into one optimizer step, so every step learns every dataset (a step costs the sum of its
  sub-batches);
- ``"one"``: one dataset is drawn per batch, from (seed, i) alone, so the labeled and unlabeled
  batches of step ``i`` come from the same dataset and every step costs about the same.
In both, a batch holds one dataset; SGD stalled on such batches where mixed batches learnt, and
Adam learnt, a little faster per sample with ``"each"`` (benchmarks/RESULTS.md).
Where a dataset declares another's structures absent and that dataset shows images another way
(``model.absent_views``), each labeled item also holds ``"absent_views"``: per view, a few random
patches of the dataset's images as the other dataset's plan and patch show them, unlabeled.
Because a batch depends only on its number, the loader can run in background workers in any order
and a resumed run continues with exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import blosc2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..atomic import read_json
from ..errors import InputError, Problem
from ..model.augmentation_settings import AugmentationSettings
from ..model.plans_view import PlansView
from ..model.absent_views import AbsentView
from ..preprocessing.cache import cache_folder, configuration_digests
from .augmentation import augment, build_transforms, source_patch_size


class CaseStore:
    """The cached cases of an experiment, by key ``Dataset/case_id``."""

    def __init__(self, plans: dict, plans_root: Path, configuration: str, keys: list[str]):
        # a blosc2 thread pool does not survive fork() into loader workers; patches are small anyway
        blosc2.set_nthreads(1)
        self.root = cache_folder(plans_root, plans["experiment"], configuration)
        self.properties: dict[str, dict] = {}
        self._open: dict[str, tuple] = {}
        problems = []
        missing: dict[str, list[Path]] = {}  # per cache folder
        digests = configuration_digests(plans, configuration)
        for key in keys:
            dataset, case_id = key.split("/", 1)
            path = self.root / dataset / f"{case_id}.json"
            if not path.is_file():
                missing.setdefault(dataset, []).append(path)
                continue
            props = read_json(path)
            if props.get("settings_digest") != digests[dataset]:
                problems.append(Problem(str(path), "cached case was made with other settings than plans.json",
                                        f"rerun versemi_plan_and_preprocess -e {plans['experiment']} to update it"))
            self.properties[key] = props
        for paths in missing.values():
            more = f" and {len(paths) - 1} more case(s) of {paths[0].parent.name}" if len(paths) > 1 else ""
            problems.append(Problem(f"{paths[0]}{more}", "cached case missing",
                                    f"run versemi_plan_and_preprocess -d {' '.join(plans['dataset_names'])} "
                                    f"-e {plans['experiment']} -c {configuration} to fill the cache"))
        if problems:
            raise InputError(problems)

    def arrays(self, key: str) -> tuple[blosc2.NDArray, blosc2.NDArray | None]:
        """Lazily opened (data, seg) arrays; slicing them reads only the chunks needed."""
        if key not in self._open:
            props, folder = self.properties[key], self.root / key.split("/", 1)[0]
            files = props["files"]
            data = blosc2.open(str(folder / files["data"]["name"]), mode="r")
            seg = blosc2.open(str(folder / files["seg"]["name"]), mode="r") if "seg" in files else None
            self._open[key] = (data, seg)
        return self._open[key]

    def __getstate__(self):  # open handles are per process
        state = dict(self.__dict__)
        state["_open"] = {}
        return state


@dataclass
class StreamSettings:
    batch_size: int
    patch_size: list[int]
    labeled: bool
    oversample_foreground: float = 0.33
    augmentation: AugmentationSettings = field(default_factory=AugmentationSettings)
    spatial_dims: int = 3  # 2: patches are single slices (1, y, x), augmented in-plane
    dataset_patch_sizes: dict[str, list[int]] | None = None  # datasets with a patch of their own
    dataset_batches: str = "one"  # with dataset_patch_sizes: "each" dataset every item, or "one" per item


def _stream_seed(seed: int, stream: str, iteration: int) -> int:
    return zlib.crc32(f"{seed}/{stream}/{iteration}".encode())


def crop_with_padding(array, center, size) -> np.ndarray:
    """Region of ``size`` around ``center`` (spatial axes), zero-padded where it leaves the array."""
    shape = array.shape[1:]
    lo = [int(c) - s // 2 for c, s in zip(center, size)]
    src = tuple(slice(max(0, l), min(dim, l + s)) for l, s, dim in zip(lo, size, shape))
    out = np.zeros((array.shape[0], *size), dtype=array.dtype)
    dst = tuple(slice(sl.start - l, sl.stop - l) for sl, l in zip(src, lo))
    out[(slice(None),) + dst] = array[(slice(None),) + src]
    return out


class BatchSource(Dataset):
    """Map-style dataset whose item ``i`` is the whole batch number ``i`` of one stream."""

    def __init__(self, store: CaseStore, keys: list[str], plans: dict, settings: StreamSettings,
                 seed: int, stream: str, absent_views: list[tuple[AbsentView, list[str]]] = (),
                 patches_per_view: int = 1):
        """``absent_views``: (view, the store keys of its cases) whose patches each item adds."""
        if not keys:
            raise ValueError(f"stream {stream!r} has no cases")
        self.store, self.settings, self.seed, self.stream = store, settings, seed, stream
        self.absent_views, self.patches_per_view = list(absent_views), patches_per_view
        self.by_dataset: dict[str, list[str]] = {}
        for key in sorted(keys):
            self.by_dataset.setdefault(key.split("/", 1)[0], []).append(key)
        self.datasets = sorted(self.by_dataset)
        # prompts of each dataset: (prompt index, label value)
        self.prompts = {name: [(p["index"], p["label_value"]) for p in PlansView(plans).prompts_of(name)]
                        for name in plans["dataset_names"]}
        self.dataset_index = {name: i for i, name in enumerate(plans["dataset_names"])}
        self.plan_datasets = list(plans["dataset_names"])
        # per patch: the larger region cropped before spatial augmentation, and the transforms
        self.geometry = {tuple(patch): (source_patch_size(patch, settings.augmentation, settings.spatial_dims),
                                        build_transforms(patch, settings.augmentation, settings.spatial_dims))
                         for patch in [settings.patch_size, *(settings.dataset_patch_sizes or {}).values(),
                                       *(view.patch for view, _ in self.absent_views)]}

    def __len__(self) -> int:  # batches are made on demand; the sampler decides how many
        return 2 ** 62

    def _batch_datasets(self, iteration: int) -> tuple[list[str], list[int]]:
        """(datasets the batch's samples are drawn from, its patch size)."""
        own = self.settings.dataset_patch_sizes
        if not own:
            return self.datasets, list(self.settings.patch_size)
        # drawn from the step alone, not the stream: every stream's batch ``iteration`` holds this dataset
        chosen = self.plan_datasets[np.random.default_rng(_stream_seed(self.seed, "dataset", iteration))
                                    .integers(len(self.plan_datasets))]
        return self._own_batch(chosen)

    def batch_size_for(self, patch) -> int:
        """Patches in a batch of ``patch``: the stream's batch size for the shared patch; for a
        dataset's smaller patch, as many as fit in the voxels of a shared-patch batch."""
        shared, own = int(np.prod(self.settings.patch_size)), int(np.prod(patch))
        return max(self.settings.batch_size, self.settings.batch_size * shared // own)

    def _center(self, key: str, rng: np.random.Generator, foreground: bool, patch: list[int]) -> list[int]:
        props = self.store.properties[key]
        locations = props.get("class_locations") or {}
        if foreground and locations:
            label = rng.choice(sorted(locations))
            points = locations[label]
            if points:
                return list(points[rng.integers(len(points))])
        # a random patch inside the image; an image smaller than the patch sits at a random offset
        lows = [rng.integers(0, s - p + 1) if s >= p else -rng.integers(0, p - s + 1)
                for s, p in zip(props["shape"], patch)]
        return [int(lo) + p // 2 for lo, p in zip(lows, patch)]

    def _own_batch(self, dataset: str) -> tuple[list[str], list[int]]:
        """(datasets the samples of a batch of ``dataset`` are drawn from, its patch): a stream without
        cases of it (e.g. a dataset with no unlabeled cases) takes its own, at that patch."""
        patch = (self.settings.dataset_patch_sizes or {}).get(dataset, self.settings.patch_size)
        return ([dataset] if dataset in self.by_dataset else self.datasets), list(patch)

    def __getitem__(self, iteration: int) -> dict:
        if self.settings.dataset_patch_sizes and self.settings.dataset_batches == "each":
            # one batch per dataset of the plan, so that the labeled and unlabeled items pair by position
            item = {"sub_batches": [self._batch(_stream_seed(self.seed, f"{self.stream}/{name}", iteration), iteration,
                                                *self._own_batch(name)) for name in self.plan_datasets]}
        else:
            item = self._batch(_stream_seed(self.seed, self.stream, iteration), iteration,
                               *self._batch_datasets(iteration))
        if self.absent_views:
            item["absent_views"] = [self._view_batch(view, keys, iteration) for view, keys in self.absent_views]
        return item

    def _view_batch(self, view: AbsentView, keys: list[str], iteration: int) -> dict:
        """Random patches (no foreground to centre on) of a view's cases, augmented as that patch's batches are."""
        seed = _stream_seed(self.seed, f"{self.stream}/{view.name}", iteration)
        rng = np.random.default_rng(seed)
        source_size, transforms = self.geometry[tuple(view.patch)]
        data = []
        for _ in range(self.patches_per_view):
            key = keys[rng.integers(len(keys))]
            data.append(crop_with_padding(self.store.arrays(key)[0], self._center(key, rng, False, list(view.patch)),
                                          source_size))
        batch = self._augment({"data": np.stack(data).astype(np.float32)}, seed, transforms)
        return {"data": torch.from_numpy(np.ascontiguousarray(batch["data"], dtype=np.float32)),
                "dataset": torch.full((len(data),), self.dataset_index[view.dataset])}

    def _batch(self, seed: int, iteration: int, candidates: list[str], patch: list[int]) -> dict:
        rng = np.random.default_rng(seed)
        s = self.settings
        source_size, transforms = self.geometry[tuple(patch)]
        batch_size = self.batch_size_for(patch)
        data, seg, prompts, datasets, keys, positions = [], [], [], [], [], []
        for sample in range(batch_size):
            dataset = candidates[rng.integers(len(candidates))]
            key = self.by_dataset[dataset][rng.integers(len(self.by_dataset[dataset]))]
            # the last samples of a batch are forced foreground, as nnU-Net does
            foreground = s.labeled and (sample >= round(batch_size * (1 - s.oversample_foreground)))
            center = self._center(key, rng, foreground, patch)
            slices = self.store.properties[key]["shape"][0]
            positions.append(min(1.0, max(0.0, center[0] / max(1, slices - 1))))
            image, labels = self.store.arrays(key)
            data.append(crop_with_padding(image, center, source_size))
            if s.labeled:
                seg.append(crop_with_padding(labels, center, source_size))
                prompts.append(self.prompts[dataset][rng.integers(len(self.prompts[dataset]))])
            datasets.append(self.dataset_index[dataset])
            keys.append(key)
        batch = {"data": np.stack(data).astype(np.float32)}
        if s.labeled:
            batch["seg"] = np.stack(seg).astype(np.float32)
        batch = self._augment(batch, seed, transforms)
        out = {"data": torch.from_numpy(np.ascontiguousarray(batch["data"], dtype=np.float32)),
               "dataset": torch.tensor(datasets), "keys": keys, "iteration": iteration,
               # meta-labels that come for free: where along z the patch lies in its scan (0..1), and the scan
               "position": torch.tensor(positions, dtype=torch.float32),
               "scan": torch.tensor([zlib.crc32(k.encode()) for k in keys], dtype=torch.int64)}
        if s.labeled:
            labels = np.rint(batch["seg"]).astype(np.int64)
            values = torch.tensor([v for _, v in prompts]).view(-1, 1, 1, 1, 1)
            labels = torch.from_numpy(labels)
            out["prompt"] = torch.tensor([p for p, _ in prompts])
            out["target"] = (labels == values).float()   # the sample's own prompt's label
            out["foreground"] = (labels > 0).float()     # union of its dataset's labels (synthetic task)
        return out

    def _augment(self, batch: dict, seed: int, transforms) -> dict:
        if transforms is None:
            return batch
        np.random.seed(seed % 2 ** 32)  # batchgenerators draws from the global generators
        random.seed(seed)
        return augment(transforms, batch, self.settings.spatial_dims)


def sub_batch_pairs(labeled: dict, unlabeled: dict | None) -> list[tuple[dict, dict | None]]:
    """The (labeled, unlabeled) pairs one optimizer step trains on: the batches themselves, or, for a
    step of sub-batches (``dataset_batches`` "each"), each dataset's labeled and unlabeled sub-batch."""
    if "sub_batches" not in labeled:
        return [(labeled, unlabeled)]
    parts = labeled["sub_batches"]
    return list(zip(parts, unlabeled["sub_batches"] if unlabeled is not None else [None] * len(parts)))


def batch_loader(source: BatchSource, start: int, stop: int, num_workers: int) -> DataLoader:
    """Batches ``start`` .. ``stop - 1`` of a stream, made by ``num_workers`` background processes.

    Workers are forked from the training process, so they exit with it (even on SIGKILL); the
    trainer starts them once per run, and blosc2 runs single-threaded (``CaseStore``), so no
    fork ever copies a busy decompression thread pool (which deadlocked workers).
    """
    return DataLoader(source, batch_size=None, sampler=range(start, stop), num_workers=num_workers,
                      prefetch_factor=2 if num_workers else None, pin_memory=torch.cuda.is_available())
