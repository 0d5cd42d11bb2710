"""Where trained models live: ``results/<experiment>/<trainer>__<configuration>/fold_<f>/checkpoint_<kind>.pth``.

Training writes there (``output_folder``); prediction, bundles and the benchmark find the
experiment and its checkpoints there (``find_experiment_dir``, ``checkpoint_paths``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .. import paths
from ..errors import InputError, Problem, input_error
from .plans_view import DEFAULT_CONFIGURATION

FOLDS = [str(i) for i in range(5)] + ["all"]
CHECKPOINT_KINDS = ("final", "best", "latest")


def parse_fold(text: str) -> str:
    fold = text[4:] if text.startswith("fold") else text
    if fold not in FOLDS:
        raise input_error(f"fold {text!r}", "is not a fold", "use fold0 .. fold4, 0 .. 4 or all")
    return fold


def find_experiment(plans_root: Path, name: str | None) -> str:
    """The planned experiment ``name``, or the single one planned under ``plans_root``."""
    planned = sorted(p.parent.name for p in plans_root.glob("*/plans.json")) if plans_root.is_dir() else []
    if name:
        if name not in planned:
            raise input_error(plans_root / name / "plans.json", f"experiment {name!r} was not planned "
                                                                f"(planned: {', '.join(planned) or 'none'})",
                              "run versemi_plan_and_preprocess first, or pick a planned experiment with -e")
        return name
    if len(planned) == 1:
        return planned[0]
    raise input_error(plans_root, f"{'no experiment is' if not planned else 'several experiments are'} planned "
                                  f"({', '.join(planned) or 'none'})",
                      "run versemi_plan_and_preprocess first" if not planned else "choose one with -e NAME")


def model_folder(experiment_dir: Path, trainer: str, configuration: str) -> Path:
    """``<experiment>/<trainer>__<configuration>``: the folds of one trainer and configuration."""
    return Path(experiment_dir) / f"{trainer}__{configuration}"


def output_folder(experiment: str, trainer: str, configuration: str, fold: str) -> Path:
    return model_folder(paths.results_root() / experiment, trainer, configuration) / f"fold_{fold}"


def checkpoint_file(fold_folder: Path, kind: str) -> Path:
    return Path(fold_folder) / f"checkpoint_{kind}.pth"


def find_experiment_dir(name: str | None = None, plans_root: Path | None = None) -> Path:
    """``results/<experiment>``: the named one, else the single planned experiment (or, where no
    experiment is planned on this machine, the single one with results)."""
    results = paths.results_root()
    trained = sorted(p.name for p in results.iterdir() if p.is_dir()) if results.is_dir() else []
    if name is None:
        try:
            name = find_experiment(plans_root or paths.plans_root(), None)
        except InputError:
            if len(trained) != 1:
                raise
            name = trained[0]
    folder = results / name
    if not folder.is_dir():
        raise input_error(folder, f"experiment {name!r} has no trained models (experiments with results: "
                                  f"{', '.join(trained) or 'none'})",
                          "train it with versemi_train, choose another with -e, or point $VERSEMI_RESULTS at "
                          "the results folder")
    return folder


def checkpoint_paths(experiment_dir: Path, folds: Iterable[str] | None = None, trainer: str = "VerSemiTrainer",
                     configuration: str = DEFAULT_CONFIGURATION, checkpoint: str = "final") -> list[Path]:
    """``<experiment>/<trainer>__<configuration>/fold_<f>/checkpoint_<checkpoint>.pth`` per fold.

    ``folds`` None: every fold folder present (``fold_all`` only where no numbered fold exists).
    """
    if checkpoint not in CHECKPOINT_KINDS:
        raise input_error(f"--checkpoint {checkpoint}", "unknown checkpoint",
                          f"use one of {', '.join(CHECKPOINT_KINDS)}")
    experiment_dir = Path(experiment_dir)
    model_dir = model_folder(experiment_dir, trainer, configuration)
    if not model_dir.is_dir():
        present = sorted(p.name for p in experiment_dir.iterdir() if p.is_dir() and "__" in p.name) \
            if experiment_dir.is_dir() else []
        raise input_error(model_dir, f"no {trainer} model of configuration {configuration!r} was trained here "
                                     f"(trained: {', '.join(present) or 'none'})",
                          f"train one (versemi_train {configuration} fold0 -tr {trainer}), or choose -tr / -e")
    trained = [f for f in FOLDS if (model_dir / f"fold_{f}").is_dir()]
    if folds is None:
        folds = [f for f in trained if f != "all"] or trained
        if not folds:
            raise input_error(model_dir, "holds no fold_* folder", f"train a fold first (versemi_train {configuration} "
                                                                  f"fold0 -tr {trainer})")
    wanted = list(dict.fromkeys(parse_fold(str(f)) for f in folds))
    found, problems = [], []
    for fold in wanted:
        folder = model_dir / f"fold_{fold}"
        path = checkpoint_file(folder, checkpoint)
        if not folder.is_dir():
            problems.append(Problem(str(folder), f"fold {fold} was never trained (trained folds: "
                                                 f"{', '.join(trained) or 'none'})",
                                    f"train it (versemi_train {configuration} {fold} -tr {trainer}), or choose "
                                    "trained folds with -f"))
        elif not path.is_file():
            present = sorted(p.name for p in folder.glob("checkpoint_*.pth"))
            problems.append(Problem(str(path), f"missing (present: {', '.join(present) or 'no checkpoint'}); the "
                                               "fold's training has not finished",
                                    f"finish it (versemi_train {configuration} {fold} -tr {trainer} --continue), or "
                                    "choose another --checkpoint"))
        else:
            found.append(path)
    if problems:
        raise InputError(problems)
    return found
