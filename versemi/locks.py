"""Run locks: two runs never write the same training fold, cache, prediction folder or bundle at once.

A lock is a small JSON file (pid, host, start time, command) created with O_CREAT | O_EXCL, so
exactly one run creates it. A lock left by a killed run is stale when it was taken on this host by
a process that no longer exists; the next run takes it over. A lock of another host cannot be
checked from here and is never taken over.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import input_error

LOCK_NAME = ".versemi.lock"


@contextmanager
def run_lock(path: str | Path, command: str) -> Iterator[Path]:
    """Hold the lock file ``path`` for the block; InputError when another live run holds it."""
    path = Path(path)
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command}
    _acquire(path, holder)
    try:
        yield path
    finally:
        if _read(path) == holder:  # never remove a lock another run holds now
            path.unlink(missing_ok=True)


def folder_lock(folder: str | Path, command: str):
    """``run_lock`` on ``folder/.versemi.lock`` (the folder is created)."""
    return run_lock(Path(folder) / LOCK_NAME, command)


def _acquire(path: Path, holder: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            existing = _read(path)
            if existing is None or not _is_stale(existing):
                raise _held_error(path, existing, holder["command"]) from None
            if _read(path) == existing:  # still the same stale lock: not taken over meanwhile by a third run
                print(f"note: {path}: taking over the lock of {existing.get('command', 'a run')} (process "
                      f"{existing['pid']}, started {existing.get('started', '?')}), which no longer runs",
                      file=sys.stderr, flush=True)
                path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as file:
            json.dump(holder, file)
        return


def _read(path: Path) -> dict | None:
    """The holder written in a lock file; None when absent, or unreadable (e.g. being written now)."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_stale(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, run by another user
        return False
    return False


def _held_error(path: Path, holder: dict | None, command: str):
    if holder is None:
        return input_error(path, f"another run holds this lock (the file cannot be read), so {command} cannot "
                                 "write here now", f"wait for that run to finish; if none is running, delete {path}")
    where = "this host" if holder.get("host") == socket.gethostname() else f"host {holder.get('host')}"
    return input_error(path, f"{holder.get('command', 'another run')} (process {holder.get('pid')} on {where}, "
                             f"started {holder.get('started', '?')}) is writing here, so {command} cannot run now",
                       f"wait for it to finish or stop it (kill {holder.get('pid')}), or write elsewhere; if that "
                       f"process is not a versemi run, delete {path}")
