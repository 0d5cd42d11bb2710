"""Trainers by name. Each module of this package may define Trainer subclasses; a module that
fails to import is reported, but does not stop the others from being found.

To add a method: create ``versemi/training/trainers/my_method.py`` with
``class MyTrainer(Trainer)`` overriding ``train_step`` (and ``uses_unlabeled``), then
``versemi_train 3d_fullres fold0 -tr MyTrainer``.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from ...errors import input_error
from ..trainer import Trainer

DEFAULT_PACKAGES = ("versemi.training.trainers",)


def discover_trainers(packages=DEFAULT_PACKAGES) -> tuple[dict[str, type], dict[str, str]]:
    """(name -> trainer class, module -> import error) over every module of ``packages``."""
    found, broken = {"Trainer": Trainer}, {}
    for package_name in packages:
        package = importlib.import_module(package_name)
        for module_info in pkgutil.iter_modules(package.__path__, package_name + "."):
            try:
                module = importlib.import_module(module_info.name)
            except Exception as exc:  # any error in someone's trainer module must not hide the others
                broken[module_info.name] = f"{type(exc).__name__}: {exc}"
                continue
            for name, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, Trainer):
                    found[name] = obj
    return found, broken


def find_trainer(name: str, packages=DEFAULT_PACKAGES) -> type:
    found, broken = discover_trainers(packages)
    if name in found:
        return found[name]
    note = "; modules that failed to import: " + "; ".join(f"{m} ({e})" for m, e in broken.items()) if broken else ""
    raise input_error(f"-tr {name}", f"unknown trainer (known: {', '.join(sorted(found))}){note}",
                      "pick one of the known trainers, or fix the module that defines it")
