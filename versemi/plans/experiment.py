"""``versemi_plan_and_preprocess``: verify, fingerprint, plan and preprocess one experiment."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..atomic import read_json, write_json
from ..datasets.integrity import resolve_datasets
from ..datasets.layout import RawDataset
from ..errors import InputError, Problem, input_error, warn
from ..preprocessing.cache import preprocess_experiment
from . import known_absent
from .fingerprint import compute_fingerprint, fingerprint_folder, load_or_compute_fingerprint, save_fingerprint
from .planner import CONFIGURATION, CONFIGURATION_2D, PlanSettings, patch_size_problems, plan_experiment

PLANS_FILE = "plans.json"


@dataclass
class ExperimentRequest:
    dataset_names: list[str]
    raw_root: Path
    plans_root: Path
    experiment: str | None = None
    labeled_limits: dict[str, int] = field(default_factory=dict)
    num_processes: int = 2
    settings: PlanSettings = field(default_factory=PlanSettings)
    overwrite_plans: bool = False
    show_progress: bool = True
    # --known-absent: per dataset name, other datasets' structures never in its images, or "all"
    known_absent: dict[str, list[str]] | str | None = None
    # -c: the configurations whose cache to fill (None: 3d_fullres, or 2d where no 3d is planned)
    configurations: list[str] | None = None

    @property
    def experiment_name(self) -> str:
        if self.experiment:
            return self.experiment
        parts = [n if n not in self.labeled_limits else f"{n}-{self.labeled_limits[n]}labeled"
                 for n in self.dataset_names]
        return "_".join(parts)


def plans_path(plans_root: Path, experiment: str) -> Path:
    return plans_root / experiment / PLANS_FILE


def verify(request: ExperimentRequest) -> list[RawDataset]:
    """Check every dataset fully (reading every file); raise one InputError listing all problems."""
    datasets, problems = _load(request)
    for dataset in datasets:
        try:
            compute_fingerprint(dataset, request.num_processes, request.show_progress)
        except InputError as exc:
            problems.extend(exc.problems)
    if problems:
        raise InputError(problems)
    return datasets


def _load(request: ExperimentRequest) -> tuple[list[RawDataset], list[Problem]]:
    datasets, problems = resolve_datasets(request.raw_root, request.dataset_names)
    by_request_name = dict(zip(request.dataset_names, datasets)) if len(datasets) == len(request.dataset_names) else {}
    for name, limit in request.labeled_limits.items():
        if name not in request.dataset_names:
            problems.append(Problem(f"--labeled {name}={limit}", f"dataset {name!r} is not among -d {request.dataset_names}",
                                    "name one of the planned datasets"))
        elif name in by_request_name and not 1 <= limit <= len(by_request_name[name].labeled_cases()):
            available = len(by_request_name[name].labeled_cases())
            problems.append(Problem(f"--labeled {name}={limit}", f"{name} has {available} labeled cases",
                                    f"give a number from 1 to {available}"))
    scales = request.settings.spacing_scale
    for name in scales if isinstance(scales, dict) else []:
        if name not in request.dataset_names:
            problems.append(Problem(f"--spacing-scale {name}={scales[name]:g}", f"dataset {name!r} is not among "
                                                                               f"-d {request.dataset_names}",
                                    "name one of the planned datasets"))
    for problem in patch_size_problems(request.settings.patch_size):
        problems.append(Problem("--patch-size", problem, "write e.g. --patch-size 2d=160x224 or 3d_fullres=64x128x128"))
    if len(datasets) == len(request.dataset_names):
        try:
            request_absent(request, datasets)
        except InputError as exc:
            problems.extend(exc.problems)
    return datasets, problems


def request_absent(request: ExperimentRequest, datasets: list[RawDataset]) -> dict[str, list[str]]:
    """The structures each dataset declares absent (dataset.json, replaced by --known-absent)."""
    return known_absent.resolve({d.name: d.labels for d in datasets},
                                {d.name: d.meta.get(known_absent.KEY) for d in datasets}, request.known_absent)


def plan_and_preprocess(request: ExperimentRequest, preprocess: bool = True) -> dict:
    """Fingerprint (reused when raw data is unchanged), plan, write plans.json, fill the cache."""
    datasets, problems = _load(request)
    results = {}
    for dataset in datasets:
        try:
            # fingerprints are written only once every dataset has passed its checks
            results[dataset.name] = load_or_compute_fingerprint(dataset, request.plans_root, request.num_processes,
                                                                request.show_progress, write=False)
        except InputError as exc:
            problems.extend(exc.problems)
    if problems:
        raise InputError(problems)
    for dataset in datasets:
        save_fingerprint(fingerprint_folder(request.plans_root, dataset.name), *results[dataset.name])
    limits = {d.name: request.labeled_limits.get(requested) for requested, d in zip(request.dataset_names, datasets)}
    settings = request.settings
    if isinstance(settings.spacing_scale, dict):  # by the names given with -d, as --labeled
        settings = replace(settings, spacing_scale={d.name: settings.scale_of(requested)
                                                    for requested, d in zip(request.dataset_names, datasets)})
    plans = plan_experiment(request.experiment_name,
                            {d.name: results[d.name][0] for d in datasets},
                            {d.name: d.is_ct for d in datasets}, limits,
                            {d.name: d.meta.get("case_order") or [] for d in datasets},
                            {d.name: results[d.name][1] for d in datasets}, settings,
                            request_absent(request, datasets),
                            {d.name: d.meta.get("case_groups") for d in datasets})
    path = plans_path(request.plans_root, plans["experiment"])
    warn_structures_beyond_patch(plans)
    configurations = cached_configurations(plans, request.configurations, path)
    _write_plans(plans, path, request.overwrite_plans)
    summary = {"experiment": plans["experiment"], "plans": str(path), "caches": []}
    if preprocess:
        for configuration in configurations:
            summary["caches"].append(preprocess_experiment(plans, {d.name: d for d in datasets}, request.plans_root,
                                                           configuration, request.num_processes,
                                                           request.show_progress))
    return summary


def warn_structures_beyond_patch(plans: dict) -> None:
    """One warning per configuration and dataset whose labeled structures do not fit its patch."""
    for name, configuration in plans["configurations"].items():
        for dataset, beyond in configuration.get("structures_beyond_patch", {}).items():
            if beyond["cases"]:
                flag = "2d=YxX" if name == CONFIGURATION_2D else "3d_fullres=ZxYxX"
                warn(Problem(f"{dataset} ({name} patch)",
                             f"{beyond['cases']} of {beyond['of']} labeled cases have structures wider than the "
                             f"patch ({' x '.join(f'{v:g}' for v in beyond['patch_mm'])} mm; largest "
                             f"{' x '.join(f'{v:g}' for v in beyond['largest_mm'])} mm): the network never sees "
                             "them whole",
                             f"where a structure is recognised by its outline, plan a patch that covers it "
                             f"(--patch-size {flag}, at a coarser --spacing-scale to keep the step cheap)"))


def cached_configurations(plans: dict, requested: list[str] | None, path: Path) -> list[str]:
    """The configurations to preprocess: those asked for (each must be planned), else 3d_fullres,
    or 2d where the plan has no 3d configuration (datasets of single images)."""
    planned = list(plans["configurations"])
    if not requested:
        return [CONFIGURATION if CONFIGURATION in planned else CONFIGURATION_2D]
    unknown = [name for name in requested if name not in planned]
    if unknown:
        raise input_error(path, f"plans no configuration {', '.join(map(repr, unknown))}",
                          f"choose among {', '.join(planned)} with -c")
    return list(dict.fromkeys(requested))


def _write_plans(plans: dict, path: Path, overwrite: bool) -> None:
    """Write plans.json; an existing, different plan (perhaps edited by hand) is kept unless asked."""
    normalized = json.loads(json.dumps(plans))
    if path.is_file():
        try:
            existing = read_json(path)
        except ValueError:
            existing = None
        if existing == normalized:
            return
        if _only_adds_configurations(existing, normalized):
            write_json(normalized, path)  # a plan of an earlier version gains the new configurations, nothing else
            return
        if not overwrite:
            raise input_error(path, "an experiment of this name was already planned differently (edited by hand, "
                                    "or the raw data or settings changed)",
                              "pass --overwrite-plans to replace it, or choose another name with -e")
    write_json(normalized, path)


def _only_adds_configurations(existing: dict | None, new: dict) -> bool:
    """Whether ``new`` is ``existing`` with more configurations and every existing one unchanged."""
    if not isinstance(existing, dict) or not isinstance(existing.get("configurations"), dict):
        return False
    old_configurations, new_configurations = existing["configurations"], new["configurations"]
    same_rest = {k: v for k, v in existing.items() if k != "configurations"} == \
        {k: v for k, v in new.items() if k != "configurations"}
    kept = all(new_configurations.get(name) == plan for name, plan in old_configurations.items())
    return same_rest and kept and set(new_configurations) > set(old_configurations)
