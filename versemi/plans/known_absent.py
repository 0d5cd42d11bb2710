"""Structures known to be absent from a dataset's images (``known_absent``).

Datasets planned together label different structures. By default a structure another dataset
labels is *unknown* in an image (partial labels): it may be there, unannotated. Where the user
knows better (a hippocampus crop never shows a left atrium), a dataset declares other datasets'
structures absent from every one of its images, in its raw ``dataset.json``:

    "known_absent": ["LA", "Pancreas/pancreas"]      # a whole dataset's structures, or one label

or at planning time, which replaces the dataset.json entry of the datasets it names:

    versemi_plan_and_preprocess -d LA Hippocampus --known-absent LA=Hippocampus Hippocampus=LA
    versemi_plan_and_preprocess -d LA Hippocampus --known-absent all   # no dataset shows another's

The plan stores the result per dataset as ``"known_absent": ["Other/label", ...]`` (absent key:
nothing declared). Training then teaches the network that those structures are absent from the
dataset's images (``losses.exclusion_loss``), and prediction can leave them out.
"""
from __future__ import annotations

from ..errors import InputError, Problem

KEY = "known_absent"
ALL = "all"


def parse_cli(entries: list[str]) -> dict[str, list[str]] | str:
    """``--known-absent`` values: ``NAME=OTHER[,OTHER/LABEL...]`` per dataset (``NAME=``: nothing),
    or the single word ``all``."""
    if entries == [ALL]:
        return ALL
    declared: dict[str, list[str]] = {}
    for entry in entries:
        name, sep, others = entry.partition("=")
        if not sep or not name:
            raise InputError([Problem(f"--known-absent {entry}", "expected NAME=OTHER[,OTHER/LABEL...] or the word all",
                                      "write e.g. --known-absent LA=Hippocampus Hippocampus=LA, or --known-absent all")])
        declared[name] = [o for o in others.split(",") if o]
    return declared


def resolve(labels: dict[str, dict[str, int]], from_dataset_json: dict[str, object],
            from_cli: dict[str, list[str]] | str | None = None) -> dict[str, list[str]]:
    """Per dataset, the sorted ``Other/label`` names declared absent from its images.

    ``labels``: each planned dataset's labels (name -> value, background included);
    ``from_dataset_json``: each dataset's ``known_absent`` entry as read (None where absent).
    Raises one InputError listing every entry that names an unknown dataset or label, the dataset
    itself, or is not a list of names.
    """
    structures = {name: sorted(k for k, v in dataset_labels.items() if v != 0) for name, dataset_labels in labels.items()}
    if from_cli == ALL:
        return {name: sorted(f"{other}/{label}" for other in structures if other != name for label in structures[other])
                for name in structures}
    problems: list[Problem] = []
    requests: dict[str, tuple[str, object]] = {}
    for name, entry in from_dataset_json.items():
        if entry is not None:
            requests[name] = (f"{name}/dataset.json", entry)
    for name, entry in (from_cli or {}).items():
        if name not in structures:
            problems.append(Problem(f"--known-absent {name}=...", f"dataset {name!r} is not planned here "
                                                                 f"(planned: {', '.join(structures)})",
                                    "name one of the datasets given with -d"))
            continue
        requests[name] = (f"--known-absent {name}=", entry)
    resolved: dict[str, list[str]] = {}
    for name, (source, entry) in requests.items():
        if not isinstance(entry, list) or not all(isinstance(e, str) for e in entry):
            problems.append(Problem(source, f"{KEY} must be a list of dataset or dataset/label names (got {entry!r})",
                                    f'write e.g. "{KEY}": ["{next((o for o in structures if o != name), "Other")}"]'))
            continue
        names: set[str] = set()
        for item in entry:
            other, _, label = item.partition("/")
            if other == name:
                problems.append(Problem(source, f"{item!r} names the dataset's own structures, which its labels give",
                                        "list only other datasets' structures"))
            elif other not in structures:
                problems.append(Problem(source, f"{item!r} names dataset {other!r}, which is not planned here "
                                                f"(planned: {', '.join(structures)})",
                                        "plan that dataset too, or remove the entry (a misspelt name would "
                                        "silently declare nothing)"))
            elif label and label not in structures[other]:
                problems.append(Problem(source, f"{item!r}: {other} has no label {label!r} "
                                                f"(its labels: {', '.join(structures[other])})",
                                        f"use one of {other}'s labels, or {other!r} for all of them"))
            else:
                names.update(f"{other}/{lab}" for lab in ([label] if label else structures[other]))
        if names:
            resolved[name] = sorted(names)
    if problems:
        raise InputError(problems)
    return resolved
