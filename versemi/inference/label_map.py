"""Several prompts into one label map: the values written for each prompt, the overlap rule, and
the table written next to the outputs (``labels.json``).

Values: each prompt's own label value (``dataset.json``) when those are distinct among the
prompts predicted together, as a user of that dataset expects; otherwise (two datasets that both
call their structure 1) the prompts are numbered 1..K in the experiment's prompt order. Overlaps:
a voxel that two or more prompts claim (probability > 0.5) takes the prompt with the highest
probability.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from .postprocessing import largest_connected_component

THRESHOLD = 0.5
OVERLAP_RULE = "highest probability: a voxel claimed by several prompts (probability > 0.5) takes the most probable"


@dataclass(frozen=True)
class LabelTable:
    """The output value of each predicted prompt, in prompt order."""

    prompts: tuple[dict, ...]
    values: tuple[int, ...]
    # (prompt, why) of structures not predicted because the images' dataset declares them absent
    left_out: tuple[tuple[dict, str], ...] = ()

    @property
    def own_values(self) -> bool:
        return all(v == p["label_value"] for p, v in zip(self.prompts, self.values))

    def to_json(self) -> dict:
        return {"background": 0,
                "labels": [{"value": v, "dataset": p["dataset"], "label": p["label"], "label_value": p["label_value"],
                            "prompt": p["index"]} for p, v in zip(self.prompts, self.values)],
                "values": "each dataset's own label values" if self.own_values else
                          "1..K in prompt order (the datasets' own values collide)",
                "overlaps": OVERLAP_RULE,
                **({"not_predicted": [{"dataset": p["dataset"], "label": p["label"], "prompt": p["index"], "why": why}
                                      for p, why in self.left_out]} if self.left_out else {})}


def label_table(prompts: list[dict], left_out: list[tuple[dict, str]] = ()) -> LabelTable:
    own = [int(p["label_value"]) for p in prompts]
    values = own if len(set(own)) == len(own) and 0 not in own else list(range(1, len(prompts) + 1))
    return LabelTable(tuple(prompts), tuple(values), tuple(left_out))


def compose(probabilities: np.ndarray, table: LabelTable, lcc: set[int] = frozenset()) -> np.ndarray:
    """(K, Z, Y, X) probabilities -> one label map (uint8, or uint16 above 255) by the overlap rule;
    the prompts whose index is in ``lcc`` keep only their largest connected component."""
    best = probabilities.argmax(0)
    claimed = probabilities.max(0) > THRESHOLD
    dtype = np.uint8 if max(table.values) < 256 else np.uint16
    labels = np.zeros(best.shape, dtype)
    for k, (prompt, value) in enumerate(zip(table.prompts, table.values)):
        mask = claimed & (best == k)
        if prompt["index"] in lcc:
            mask = largest_connected_component(mask)
        labels[mask] = value
    return labels


def write_label_table(table: LabelTable, folder: Path) -> Path:
    path = Path(folder) / "labels.json"
    with atomic_path(path, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(table.to_json(), indent=2) + "\n", encoding="utf-8")
    return path
