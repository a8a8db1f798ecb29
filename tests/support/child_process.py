"""The environment of a child Python process started by a test (``python -m contraseg.cli``, a
worker, a process killed on purpose)."""

from __future__ import annotations

import os
from pathlib import Path

import contraseg

SRC = Path(contraseg.__file__).parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with the source tree first on PYTHONPATH, then whatever
    PYTHONPATH the test run had (packages installed with ``pip --target`` on a lent GPU machine,
    say), and one thread per process."""
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}
