"""Decide from cross-validation whether the largest connected component helps, per prompt (nnU-Net's rule).

    decisions = find_postprocessing(results_root() / "DemoLA_DemoPancreas")
    decisions["prompts"]["DemoLA/left_atrium"]["apply_lcc"]

For each trained fold, that fold's model alone predicts the fold's validation cases
(``plans["splits"]["folds"][f]["val"]``) from their raw images, in the original geometry
(``predict_case``: crop, normalize, resample, sliding window, resample back, un-crop). Each case
is scored with the Dice of every prompt of its dataset against the raw label, once as predicted
and once reduced to its largest connected component (LCC). A prompt keeps LCC when the mean Dice
over all its validation cases with LCC is not lower than without (applied if it improves or stays
equal, as nnU-Net decides). The result goes to
``results/<experiment>/<Trainer>__<configuration>/postprocessing.json`` (written atomically),
which ``versemi_predict --postprocessing auto`` reads.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

import numpy as np

from .. import paths
from ..atomic import read_json, write_json
from ..console import progress_bar
from ..datasets.io import read_label
from ..datasets.layout import find_dataset, load_dataset
from ..errors import InputError, Problem, input_error
from ..evaluation.metrics import dice
from ..model.layout import FOLDS, model_folder, parse_fold
from ..model.plans_view import DEFAULT_CONFIGURATION, PlansView
from .postprocessing import largest_connected_component
from .predictor import _canonical, load_models, predict_case

POSTPROCESSING_FILE = "postprocessing.json"
RULE = ("apply the largest connected component to a prompt when its mean validation Dice with it is not lower than "
        "without it (improves or stays equal; nnU-Net's rule)")


def postprocessing_path(experiment_dir: str | Path, trainer: str = "VerSemiTrainer",
                        configuration: str = DEFAULT_CONFIGURATION) -> Path:
    """``results/<experiment>/<trainer>__<configuration>/postprocessing.json``."""
    return model_folder(experiment_dir, trainer, configuration) / POSTPROCESSING_FILE


def prompt_key(prompt: dict) -> str:
    return f"{prompt['dataset']}/{prompt['label']}"


def _cross_validation_folds(experiment_dir: Path, trainer: str, configuration: str,
                            folds: Iterable[str] | None) -> list[str]:
    model_dir = model_folder(experiment_dir, trainer, configuration)
    if folds is None:
        folds = [f for f in FOLDS if f != "all" and (model_dir / f"fold_{f}").is_dir()]
        if not folds:
            raise input_error(model_dir, "holds no trained cross-validation fold (fold_0 .. fold_4); fold 'all' has "
                                         "no validation cases",
                              f"train folds first (versemi_train {configuration} fold0 -tr {trainer}, ... fold4)")
    wanted = list(dict.fromkeys(parse_fold(str(f)) for f in folds))
    if "all" in wanted:
        raise input_error("-f all", "fold 'all' trains on every labeled case and has no validation cases",
                          "choose cross-validation folds 0 .. 4")
    return wanted


def _raw_cases(dataset_names: Iterable[str], raw_root: Path) -> tuple[dict[str, dict], list[Problem]]:
    """Dataset -> {case id: RawCase} of the labeled training cases in the raw folders."""
    cases, problems = {}, []
    for name in dataset_names:
        try:
            dataset = load_dataset(find_dataset(raw_root, name))
        except InputError as exc:
            problems.extend(exc.problems)
            continue
        cases[name] = {c.case_id: c for c in dataset.labeled_cases()}
    return cases, problems


def find_postprocessing(experiment_dir: str | Path, trainer: str = "VerSemiTrainer",
                        configuration: str = DEFAULT_CONFIGURATION,
                        folds: Iterable[str] | None = None, checkpoint: str = "final", raw_root: str | Path | None = None,
                        device: str = "cpu", step: float = 0.5, mirroring: bool = True, connectivity: int = 26,
                        write: bool = True, show_progress: bool = True) -> dict:
    """Per prompt, whether the largest connected component keeps or raises the mean cross-validation
    Dice; returns the decisions and (``write``) writes them to ``postprocessing_path``.

    ``folds`` None: every trained fold 0 .. 4 (fold ``all`` has no validation cases). ``raw_root``:
    where the raw datasets are (default ``$VERSEMI_RAW``). Every missing raw case or label is reported
    at once before any prediction.
    """
    experiment_dir = Path(experiment_dir)
    raw_root = Path(raw_root) if raw_root is not None else paths.raw_root()
    fold_names = _cross_validation_folds(experiment_dir, trainer, configuration, folds)
    ensembles = {fold: load_models(experiment_dir, [fold], trainer, configuration, checkpoint, device)
                 for fold in fold_names}
    plans = ensembles[fold_names[0]].plans
    for fold in fold_names[1:]:
        if _canonical(ensembles[fold].plans) != _canonical(plans):
            raise input_error(ensembles[fold].models[0].checkpoint, f"holds other plans than fold {fold_names[0]} "
                                                                    "(planned again since?)",
                              "decide from folds trained on the same plans (-f)")
    real_prompts = PlansView(plans).real_prompts
    raw, problems = _raw_cases(plans["dataset_names"], raw_root)
    work = []  # (fold, dataset, case)
    for fold in fold_names:
        for key in plans["splits"]["folds"][int(fold)]["val"]:
            dataset, case_id = key.split("/", 1)
            if dataset not in raw:
                continue  # its dataset folder is missing: reported above
            case = raw[dataset].get(case_id)
            if case is None:
                problems.append(Problem(str(raw_root / dataset / "imagesTr"), f"validation case {case_id!r} of fold "
                                                                              f"{fold} is not a labeled case here",
                                        "point --raw / $VERSEMI_RAW at the raw data the experiment was planned from"))
            elif not case.label.is_file():
                problems.append(Problem(str(case.label), f"label of validation case {case_id!r} is missing",
                                        "restore the raw dataset the experiment was planned from"))
            else:
                work.append((fold, dataset, case))
    if problems:
        raise InputError(problems)
    if not work:
        raise input_error(experiment_dir, f"folds {', '.join(fold_names)} have no validation cases",
                          "train cross-validation folds of an experiment with at least 5 labeled cases")

    started = time.time()
    per_case = []
    for fold, dataset, case in progress_bar(work, desc="cross-validation", unit="case", show=show_progress):
        reference, _ = read_label(case.label)
        scores = {}
        for prompt in (p for p in real_prompts if p["dataset"] == dataset):
            mask = predict_case(ensembles[fold], case.images, prompt, step, mirroring).mask.astype(bool)
            target = reference == prompt["label_value"]
            if mask.shape != target.shape:
                raise input_error(case.label, f"shape {target.shape} differs from the image's {mask.shape}",
                                  "restore the raw dataset the experiment was planned from")
            kept = largest_connected_component(mask, connectivity)
            scores[prompt_key(prompt)] = {"dice_without": dice(mask, target), "dice_with": dice(kept, target)}
        per_case.append({"fold": fold, "case": f"{dataset}/{case.case_id}", "dice": scores})

    decisions = {}
    for prompt in real_prompts:
        key = prompt_key(prompt)
        rows = [c["dice"][key] for c in per_case if key in c["dice"]]
        if not rows:
            continue
        without = float(np.mean([r["dice_without"] for r in rows]))
        with_lcc = float(np.mean([r["dice_with"] for r in rows]))
        decisions[key] = {"apply_lcc": bool(with_lcc >= without), "dice_without": without, "dice_with": with_lcc,
                          "cases": len(rows)}
    result = {"experiment": plans["experiment"], "trainer": trainer, "configuration": configuration,
              "checkpoint": checkpoint, "folds": fold_names, "rule": RULE, "connectivity": connectivity,
              "step": step, "mirroring": mirroring, "space": "original geometry of the raw images",
              "seconds": round(time.time() - started, 1), "prompts": decisions, "cases": per_case}
    if write:
        target = postprocessing_path(experiment_dir, trainer, configuration)
        write_json(result, target)
        result["file"] = str(target)
    return result


def format_decisions(result: dict) -> str:
    """The decisions as a table: prompt, cases, mean Dice without and with LCC, decision."""
    width = max([len("prompt")] + [len(k) for k in result["prompts"]])
    lines = [f"{'prompt':<{width}}  cases  Dice w/o LCC  Dice with LCC  apply LCC",
             f"{'-' * width}  -----  ------------  -------------  ---------"]
    for key, d in result["prompts"].items():
        lines.append(f"{key:<{width}}  {d['cases']:>5}  {100 * d['dice_without']:>12.2f}  {100 * d['dice_with']:>13.2f}"
                     f"  {'yes' if d['apply_lcc'] else 'no':>9}")
    return "\n".join(lines)


def load_lcc_decision(experiment_dir: str | Path, trainer: str, configuration: str, prompt: dict) -> dict:
    """The decision for ``prompt`` in ``postprocessing.json``; InputError naming
    ``versemi_find_postprocessing`` where the file or the prompt's entry is missing."""
    path = postprocessing_path(experiment_dir, trainer, configuration)
    fix = (f"run versemi_find_postprocessing -e {Path(experiment_dir).name} -tr {trainer} -c {configuration} first, "
           "or choose --lcc / no --lcc yourself")
    if not path.is_file():
        raise input_error(path, "missing: no postprocessing was determined for this model", fix)
    try:
        result = read_json(path)
        decisions = result["prompts"]
    except (ValueError, KeyError, TypeError) as exc:
        raise input_error(path, f"is not a postprocessing decision file ({type(exc).__name__})", fix) from exc
    key = prompt_key(prompt)
    if key not in decisions:
        raise input_error(path, f"holds no decision for prompt {key} (decided: {', '.join(decisions) or 'none'})", fix)
    return {**decisions[key], "folds": result.get("folds"), "file": str(path)}
