"""Other datasets' views of a dataset's images, where its declared absences must hold too.

``versemi_predict -p all`` shows an image to each structure's prompt as that structure's dataset
plan prepares its own images (normalization, spacing) and slides that dataset's patch over it, so
that an image of unknown origin meets every structure as that structure's data looked. A
hippocampus crop thus reaches the atrium prompt resampled to LA's spacing, in LA's window. The
exclusion loss on a dataset's own batches teaches an absence only on the dataset's own view, and
the label map then still claimed 0.6 to 5 % of the other dataset's voxels (benchmarks/RESULTS.md).

So where dataset D declares structures of dataset E absent (``known_absent``), training also shows
D's images as E sees them: a *view* ``D@E``. Where E prepares images as D does, the view is D's own
cache cut with E's patch; where the preparation differs, the preprocessing cache holds D's cases
prepared by E's plan in the folder ``D@E`` (``cached_view_pairs``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .plans_view import PlansView

SEPARATOR = "@"


@dataclass(frozen=True)
class AbsentView:
    dataset: str          # whose images
    shown_as: str         # whose plan prepares them, and whose patch cuts them
    patch: tuple[int, ...]
    cached: bool          # prepared differently from the dataset's own cache: its own cache folder

    @property
    def folder(self) -> str:
        """The cache folder of its cases (the dataset's own where the preparation is the same)."""
        return view_folder(self.dataset, self.shown_as) if self.cached else self.dataset

    @property
    def name(self) -> str:
        return view_folder(self.dataset, self.shown_as)


def view_folder(dataset: str, shown_as: str) -> str:
    return f"{dataset}{SEPARATOR}{shown_as}"


def plan_of_folder(folder: str) -> str:
    """The dataset whose plan prepared a cache folder's cases (``D@E`` -> E)."""
    return folder.split(SEPARATOR, 1)[1] if SEPARATOR in folder else folder


def preparation(dataset_plan: dict) -> dict:
    """What a dataset plan does to an image before the network sees it."""
    return {k: dataset_plan[k] for k in ("normalization", "target_spacing")}


def view_pairs(plans: dict) -> list[tuple[str, str]]:
    """(D, E) for every dataset D that declares a structure of another dataset E absent."""
    view = PlansView(plans)
    pairs = []
    for dataset in view.dataset_names:
        absent = set(view.known_absent_prompts(dataset))
        pairs += [(dataset, other) for other in view.dataset_names
                  if other != dataset and absent & {p["index"] for p in view.prompts_of(other)}]
    return pairs


def prepared_differently(plans: dict, configuration: str, dataset: str, other: str) -> bool:
    view = PlansView(plans)
    return preparation(view.dataset_plan(dataset, configuration)) != preparation(view.dataset_plan(other, configuration))


def cached_view_pairs(plans: dict, configuration: str) -> list[tuple[str, str]]:
    """The views the preprocessing cache must hold: those prepared unlike the dataset's own images."""
    return [(d, e) for d, e in view_pairs(plans) if prepared_differently(plans, configuration, d, e)]


def trained_views(plans: dict, configuration: str, patch_of: Callable[[str], list[int]]) -> list[AbsentView]:
    """The views training adds: each pair whose preparation or patch (``patch_of(dataset)``, the run's
    own) differs from the dataset's own batches, which already teach the absence on their view."""
    views = []
    for dataset, other in view_pairs(plans):
        cached = prepared_differently(plans, configuration, dataset, other)
        if cached or list(patch_of(other)) != list(patch_of(dataset)):
            views.append(AbsentView(dataset, other, tuple(patch_of(other)), cached))
    return views
