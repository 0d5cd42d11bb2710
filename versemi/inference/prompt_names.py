"""Prompts as users name them: ``DATASET``, ``DATASET:LABEL``, ``DATASET/LABEL``, several, or
``all``."""
from __future__ import annotations

import re
from typing import Sequence

from ..errors import input_error
from ..model.plans_view import PlansView

NNUNET_DATASET = re.compile(r"^Dataset(\d{3})_(.+)$")


def prompt_table(plans: dict) -> str:
    """The experiment's prompts as ``-p`` accepts them."""
    real = PlansView(plans).real_prompts
    entries = []
    for p in real:
        single = sum(q["dataset"] == p["dataset"] for q in real) == 1
        entries.append(f"{p['dataset']}:{p['label']}" + (f" (or {p['dataset']})" if single else ""))
    return ", ".join(entries)


def _match_dataset(names: list[str], text: str) -> str | None:
    for candidate in names:
        if candidate == text:
            return candidate
    for candidate in names:
        if candidate.lower() == text.lower():
            return candidate
    for candidate in names:  # nnU-Net's Dataset001_LA answers to LA and 1
        m = NNUNET_DATASET.match(candidate)
        if m and (m.group(2).lower() == text.lower() or (text.isdigit() and int(text) == int(m.group(1)))):
            return candidate
    return None


def resolve_prompt(plans: dict, text: str) -> dict:
    """The prompt entry of plans.json named by ``DATASET``, ``DATASET:LABEL`` or ``DATASET/LABEL``
    (LABEL: the label's name or value); InputError listing the prompt table otherwise."""
    real = PlansView(plans).real_prompts
    dataset_text, _, label_text = re.split(r"([:/])", text, maxsplit=1) if re.search(r"[:/]", text) else (text, "", "")
    dataset = _match_dataset(list(dict.fromkeys(p["dataset"] for p in real)), dataset_text.strip())
    unknown = input_error(f"-p {text}", f"unknown prompt (prompts of experiment {plans.get('experiment')!r}: "
                                        f"{prompt_table(plans)})",
                          "name a dataset, or DATASET:LABEL for a dataset with several labels")
    if dataset is None:
        raise unknown
    candidates = [p for p in real if p["dataset"] == dataset]
    label_text = label_text.strip()
    if not label_text:
        if len(candidates) == 1:
            return candidates[0]
        raise input_error(f"-p {text}", f"dataset {dataset} has {len(candidates)} labels (prompts: "
                                        f"{prompt_table(plans)})",
                          f"name one, e.g. -p {dataset}:{candidates[0]['label']}")
    for p in candidates:
        if p["label"] == label_text or p["label"].lower() == label_text.lower() or \
                (label_text.isdigit() and int(label_text) == p["label_value"]):
            return p
    raise unknown


def asks_all(texts: Sequence[str] | None) -> bool:
    """Whether ``-p`` asks for every prompt (nothing given, or ``all`` among the texts)."""
    return not texts or any(t.strip().lower() == "all" for t in texts)


def resolve_prompts(plans: dict, texts: Sequence[str] | None) -> list[dict]:
    """The prompts named by ``texts`` (each as ``resolve_prompt``; ``all``: every real prompt),
    in the experiment's prompt order, without repeats. None: ``all``."""
    real = PlansView(plans).real_prompts
    if asks_all(texts):
        return real
    chosen = {resolve_prompt(plans, t)["index"] for t in texts}
    return [p for p in real if p["index"] in chosen]


def prompts_for_dataset(plans: dict, prompts: list[dict], dataset: str, explicit: bool) -> tuple[list[dict], list[dict]]:
    """The prompts worth asking of images known to come from ``dataset``: those whose structure the
    plan declares absent from its images (``known_absent``) are left out. Returns (kept, left out).

    InputError when ``dataset`` is not planned, when an ``explicit`` request (not ``all``) names a
    structure declared absent, or when nothing would be left."""
    view = PlansView(plans)
    if dataset not in view.dataset_names:
        raise input_error(f"--from-dataset {dataset}", f"is not a dataset of experiment {plans.get('experiment')!r} "
                                                       f"(its datasets: {', '.join(view.dataset_names)})",
                          "name the dataset the images come from, or leave --from-dataset out")
    absent = set(view.known_absent_prompts(dataset))
    left_out = [p for p in prompts if p["index"] in absent]
    if left_out and explicit:
        names = ", ".join(f"{p['dataset']}/{p['label']}" for p in left_out)
        raise input_error(f"-p ... --from-dataset {dataset}", f"{dataset} declares {names} absent from its images "
                                                             "(known_absent in plans.json)",
                          "leave those prompts out, or leave --from-dataset out")
    kept = [p for p in prompts if p["index"] not in absent]
    if not kept:
        raise input_error(f"--from-dataset {dataset}", "every prompt asked is declared absent from its images",
                          f"ask one of {dataset}'s own structures (-p {dataset})")
    return kept, left_out
