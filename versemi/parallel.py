"""Run a function over many items in worker processes, with a progress bar and ETA."""
from __future__ import annotations

import multiprocessing as mp
from typing import Callable, Sequence, TypeVar

from .console import progress_bar

T = TypeVar("T")
R = TypeVar("R")


def map_with_progress(fn: Callable[[T], R], items: Sequence[T], num_processes: int, desc: str,
                      show_progress: bool = True) -> list[R]:
    """``[fn(x) for x in items]`` in order, over ``num_processes`` workers (1 = in this process).

    Workers take one item at a time, so memory stays bounded by one case per worker.
    """
    bar = progress_bar(total=len(items), desc=desc, unit="case", show=show_progress)
    try:
        if num_processes <= 1 or len(items) <= 1:
            results = []
            for item in items:
                results.append(fn(item))
                bar.update()
            return results
        with mp.get_context("fork").Pool(min(num_processes, len(items))) as pool:
            results = []
            for result in pool.imap(fn, items, chunksize=1):
                results.append(result)
                bar.update()
            return results
    finally:
        bar.close()

