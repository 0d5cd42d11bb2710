"""Where a run keeps its files: one work root holding raw/, versemi_plans/, results/ and bundles/.

The work root is ``$VERSEMI_ROOT`` (default ``./versemi_work``); each sub-folder can be moved on
its own with ``$VERSEMI_RAW``, ``$VERSEMI_PLANS``, ``$VERSEMI_RESULTS`` and ``$VERSEMI_BUNDLES``.
"""
from __future__ import annotations

import os
from pathlib import Path


def work_root() -> Path:
    return Path(os.environ.get("VERSEMI_ROOT", "versemi_work")).absolute()


def _sub(env: str, name: str) -> Path:
    value = os.environ.get(env)
    return Path(value).absolute() if value else work_root() / name


def raw_root() -> Path:
    return _sub("VERSEMI_RAW", "raw")


def plans_root() -> Path:
    return _sub("VERSEMI_PLANS", "versemi_plans")


def results_root() -> Path:
    return _sub("VERSEMI_RESULTS", "results")


def bundles_root() -> Path:
    return _sub("VERSEMI_BUNDLES", "bundles")


def root_variable(path: str | Path) -> str | None:
    """The environment variable that moves the root folder holding ``path`` (None: outside them)."""
    path = Path(path).absolute()
    for variable, root in (("VERSEMI_PLANS", plans_root()), ("VERSEMI_RESULTS", results_root()),
                           ("VERSEMI_BUNDLES", bundles_root()), ("VERSEMI_RAW", raw_root())):
        if path.is_relative_to(root):
            return variable
    return None
