"""Files written so that a reader never sees half of one: a temporary file beside the target, then a rename.

A kill midway leaves only `.<name>.tmp*` beside the target; `remove_stale_temporaries` clears those at the next
start of a run.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """write(tmp) to a temporary file beside `path` (same suffix, as torch.export.save wants), then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file gets the mode any new file gets
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path: Path) -> None:
    """torch.save(obj) to `path`, atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete what an atomic write killed midway left in `folder` (.<name>.tmp*); returns what was removed."""
    removed = []
    for tmp in folder.glob(".*.tmp*"):
        if tmp.is_file():
            tmp.unlink()
            removed.append(tmp)
    return removed
