"""Atomic file writes: a reader never sees a half-written file, whatever interrupts the writer.

Every write goes to a temporary file in the destination folder and is then renamed over the
target (``os.replace`` is atomic on POSIX and Windows when both lie on one file system).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from contraseg.errors import InputError


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success only."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def _atomic_open(target: str | Path, mode: str, write: Callable[[IO[Any]], None]) -> None:
    with atomic_path(target) as tmp, open(tmp, mode) as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def write_text(target: str | Path, text: str) -> None:
    _atomic_open(target, "w", lambda f: f.write(text))


def write_bytes(target: str | Path, data: bytes) -> None:
    _atomic_open(target, "wb", lambda f: f.write(data))


def write_json(target: str | Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_npy(target: str | Path, array: np.ndarray) -> None:
    """Uncompressed ``.npy`` so that training can memory-map it."""
    _atomic_open(target, "wb", lambda f: np.save(f, np.ascontiguousarray(array)))


# Folders no run may write into: the kernel's virtual file systems and the root itself.
_SYSTEM_DIRS = (Path("/proc"), Path("/sys"), Path("/dev"))


def check_out_dir(raw: str | Path, what: str = "--out") -> Path:
    """The absolute path of an output folder, or :class:`InputError` saying why it cannot be one.

    Refused before anything is written: an empty name (``Path("")`` would be the working
    directory), ``/`` and the kernel's virtual file systems, an existing file, a path under a
    file, and a name longer than the file system allows.
    """
    text = str(raw)
    if not text.strip():
        raise InputError(what, "must name a folder, got an empty path")
    path = Path(text).expanduser().absolute()
    resolved = Path(os.path.realpath(path))
    if resolved == Path(resolved.anchor) or any(
        resolved == d or d in resolved.parents for d in _SYSTEM_DIRS
    ):
        raise InputError(path, f"{what} may not be the root folder or a system folder")
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            raise InputError(path, f"{what}: a folder name is longer than 255 bytes")
    if path.exists() and not path.is_dir():
        raise InputError(path, f"{what} exists and is not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(path, f"{what}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK) and not path.exists():
                raise InputError(path, f"{what}: cannot create a folder in {parent}")
            break
    return path


def one_line(text: object) -> str:
    """``text`` (an exception, say) with every run of white space, newlines included, folded to
    one space: the command line promises one line per error, whatever a library put in it."""
    return " ".join(str(text).split())
