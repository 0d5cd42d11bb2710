"""Progress bars, and the one switch that silences all of them.

``--quiet`` on any console script, or ``VERSEMI_QUIET=1`` in the environment, turns off every bar:
data conversion, preprocessing, training epochs, prediction. The switch lives in the environment so
that processes started from this one (torchrun workers, worker pools) inherit it.
"""
from __future__ import annotations

import argparse
import os
from typing import Iterable

from tqdm import tqdm

QUIET_VARIABLE = "VERSEMI_QUIET"


def is_quiet() -> bool:
    return os.environ.get(QUIET_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def set_quiet(quiet: bool = True) -> None:
    if quiet:
        os.environ[QUIET_VARIABLE] = "1"
    else:
        os.environ.pop(QUIET_VARIABLE, None)


def progress_bar(iterable: Iterable | None = None, *, show: bool = True, **options) -> tqdm:
    """A tqdm bar (``options`` as tqdm's), drawn unless ``show`` is false or quiet is on."""
    return tqdm(iterable, disable=not show or is_quiet(), dynamic_ncols=True, **options)


class _QuietAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        set_quiet()


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    """``--quiet``: parsing it turns the switch on, so no command has to pass it along."""
    parser.add_argument("--quiet", action=_QuietAction, nargs=0, default=False,
                        help=f"no progress bars (the same as {QUIET_VARIABLE}=1)")
