"""Dataset converters: public datasets in their published layout -> a raw dataset folder.

Each converter is ``convert_xxx(source, output, *, overwrite=False, show_progress=True, **options)
-> Path``; it never modifies ``source`` and builds the dataset in a temporary sibling folder that
replaces ``output`` only when complete. ``convert(kind, source, output, **options)`` dispatches by
name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ...errors import input_error
from .hc18 import convert_hc18
from .la_2018 import convert_la_2018
from .la_h5 import convert_la_h5
from .msd import convert_msd
from .pancreas_nih import convert_pancreas_nih

CONVERTERS: dict[str, Callable[..., Path]] = {
    "la-h5": convert_la_h5,
    "la-2018": convert_la_2018,
    "msd": convert_msd,
    "pancreas-nih": convert_pancreas_nih,
    "hc18": convert_hc18,
}

__all__ = ["CONVERTERS", "convert", "convert_hc18", "convert_la_h5", "convert_la_2018", "convert_msd",
           "convert_pancreas_nih"]


def convert(kind: str, source: str | Path, output: str | Path, **options) -> Path:
    """Run the converter named ``kind`` (one of ``CONVERTERS``); returns the output folder."""
    if kind not in CONVERTERS:
        raise input_error(kind, "is not a known dataset format", f"use one of: {', '.join(CONVERTERS)}")
    return CONVERTERS[kind](Path(source), Path(output), **options)
