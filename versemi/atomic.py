"""Atomic file writes: write to a temporary name in the same folder, then rename.

A full disk never leaves a half-written file at the final path: the temporary file is removed and
the write raises one InputError that names the path (``disk_space_checked``).
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from . import paths
from .errors import InputError, input_error

# a write that ran out of room: no space left on the device, or the user's disk quota used up
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Not every writer says so when the disk fills: torch and blosc2 raise a RuntimeError, SimpleITK only
# prints and leaves a truncated file. Less free space than this around such a write means a full disk.
MIN_FREE_BYTES = 1 << 20


@contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` only on success.

    ``suffix`` keeps the file ending (e.g. ``.nii.gz``) so that writers which pick the format
    from the name still work on the temporary file.
    """
    target = Path(target)
    tmp_path = None
    try:
        with disk_space_checked(target, target.parent):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".partial{suffix}", dir=target.parent)
            os.close(fd)
            tmp_path = Path(tmp)
            os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp creates 0600; give the file the usual permissions
            yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def disk_space_checked(target: Path, folder: Path) -> Iterator[None]:
    """Raise one clear InputError naming ``target`` when the disk of ``folder`` fills during the block.

    The caller removes what the block wrote (the error is raised out of the block, before any rename).
    """
    try:
        yield
    except InputError:
        raise
    except Exception as exc:
        if (isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS) or _disk_full(folder):
            raise out_of_space(target) from exc
        raise
    if _disk_full(folder):
        raise out_of_space(target)


def out_of_space(target: Path) -> InputError:
    variable = paths.root_variable(target)
    elsewhere = f"point ${variable} at a folder on another disk" if variable else "write to a folder on another disk"
    return input_error(target, f"no space left on device (or disk quota exceeded) while writing {target.name}; "
                               "nothing was written there (the partial copy was removed)",
                       f"free space on that disk, or {elsewhere}")


def _disk_full(folder: Path) -> bool:
    try:
        stat = os.statvfs(folder)
    except (OSError, AttributeError):  # a folder that is gone; no statvfs on this system
        return False
    # root may write into the blocks reserved for it, other users only into the available ones
    free_blocks = stat.f_bfree if os.geteuid() == 0 else stat.f_bavail
    # file systems that report no size at all (some virtual or network ones) are not taken as full
    return stat.f_blocks > 0 and free_blocks * stat.f_frsize < MIN_FREE_BYTES


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(obj: Any, target: str | Path) -> None:
    """Write readable JSON atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
