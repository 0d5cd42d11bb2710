"""A small typed view of ``plans.json``: the questions code asks of it, answered in one place.

    view = PlansView(plans)
    view.real_prompts            # the prompts of real structures (not the synthetic one)
    view.prompts_of("DemoLA")    # one dataset's prompts
    view.configuration("3d_fullres"), view.dataset_plan("DemoLA")

The plans stay a plain dict (JSON on disk, inside every checkpoint); the view only reads it.
A plan holds one or more configurations by name (``3d_fullres``, ``2d``); code takes the name as
an argument and falls back on ``DEFAULT_CONFIGURATION`` only where the user gave none. A
configuration may set a dataset's target spacing its own way (``2d``: the slice axis is never
resampled); ``dataset_plan(name, configuration)`` gives the dataset's plan as that configuration
sees it.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CONFIGURATION = "3d_fullres"


@dataclass(frozen=True)
class PlansView:
    plans: dict

    @property
    def experiment(self) -> str | None:
        return self.plans.get("experiment")

    @property
    def dataset_names(self) -> list[str]:
        return list(self.plans["dataset_names"])

    @property
    def real_prompts(self) -> list[dict]:
        """Every prompt of a dataset's label, in prompt order (the synthetic prompt left out)."""
        return [p for p in self.plans["prompts"] if p["dataset"] is not None]

    @property
    def real_prompt_indices(self) -> list[int]:
        return [p["index"] for p in self.real_prompts]

    def prompts_of(self, dataset: str) -> list[dict]:
        return [p for p in self.plans["prompts"] if p["dataset"] == dataset]

    def known_absent(self, dataset: str) -> list[str]:
        """``Other/label`` names declared absent from the dataset's images (``plans.known_absent``)."""
        return list(self.plans["datasets"][dataset].get("known_absent", []))

    def known_absent_prompts(self, dataset: str) -> list[int]:
        """Indices of the prompts whose structure is declared absent from the dataset's images."""
        absent = set(self.known_absent(dataset))
        return [p["index"] for p in self.real_prompts if f"{p['dataset']}/{p['label']}" in absent]

    @property
    def declares_absence(self) -> bool:
        return any(self.known_absent(name) for name in self.dataset_names)

    def prompt_names(self) -> dict[int, str]:
        """Prompt index -> ``dataset/label`` (``None/None`` for the synthetic prompt)."""
        return {p["index"]: f"{p['dataset']}/{p['label']}" for p in self.plans["prompts"]}

    def has_configuration(self, name: str) -> bool:
        return name in self.plans["configurations"]

    def configuration(self, name: str) -> dict:
        return self.plans["configurations"][name]

    def spatial_dims(self, configuration: str) -> int:
        """3, or 2 for a configuration that trains on slices (``2d``)."""
        return int(self.configuration(configuration).get("spatial_dims", 3))

    def dataset_plan(self, dataset: str, configuration: str | None = None) -> dict:
        """The dataset's plan; with ``configuration``, its target spacing as that configuration has
        it (a ``null`` axis keeps each case's own spacing)."""
        plan = self.plans["datasets"][dataset]
        own = self.plans.get("configurations", {}).get(configuration, {}) if configuration else {}
        spacing = own.get("target_spacing", {})
        return {**plan, "target_spacing": spacing[dataset]} if dataset in spacing else plan
