"""Which prompts belong to which dataset. An unlabeled image may only be asked, or scored, for
the structures its own dataset labels: another dataset's structure is absent from its images or
unlabeled there (a liver prompt on a cardiac MRI has no meaningful target)."""
from __future__ import annotations

import torch

from ..errors import input_error
from ..model.plans_view import PlansView


class DatasetPrompts:
    """The real (non-synthetic) prompts of each dataset of an experiment."""

    def __init__(self, plans: dict, device: torch.device | str = "cpu") -> None:
        real = PlansView(plans).real_prompts
        self.indices = torch.tensor([p["index"] for p in real], device=device)  # (R,) prompt indices
        # (datasets, R) 0/1: which real prompts belong to each dataset
        self.mask = torch.tensor([[float(p["dataset"] == name) for p in real] for name in plans["dataset_names"]],
                                 device=device)
        empty = [name for name, row in zip(plans["dataset_names"], self.mask) if not row.any()]
        if empty:
            raise input_error("plans.json", f"dataset(s) {', '.join(empty)} have no labels to prompt for",
                              "give every dataset of the experiment at least one label in its dataset.json")

    def own(self, datasets: torch.Tensor) -> torch.Tensor:
        """(B, R) 0/1: the real prompts of each sample's dataset."""
        return self.mask[datasets.to(self.mask.device)]

    def draw(self, datasets: torch.Tensor) -> torch.Tensor:
        """(B,) one prompt index per sample, uniform over its dataset's prompts (the torch generator)."""
        choice = torch.multinomial(self.own(datasets), 1)[:, 0]
        return self.indices[choice]


def known_absent_matrix(plans: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    """(datasets, prompts) 0/1: the prompts whose structure is declared absent from each dataset's
    images (``plans.known_absent``); all 0 where nothing is declared."""
    view = PlansView(plans)
    matrix = torch.zeros(len(view.dataset_names), plans["num_prompts"], device=device)
    for row, name in enumerate(view.dataset_names):
        matrix[row, view.known_absent_prompts(name)] = 1.0
    return matrix
