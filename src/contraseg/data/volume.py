"""The in-memory form of one case, shared by every reader, and the rule for case ids."""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contraseg.errors import InputError

MAX_CASE_ID_BYTES = 255  # one file name on every common file system


def check_case_id(case_id: object, source: str | Path | None) -> str:
    """``case_id`` if it is a plain name, else :class:`InputError` naming ``source``.

    A case id names a folder of the cache (docs/data.md), so it must be one file name that
    stays inside it: not empty, not ``.``/``..`` nor hidden (``.`` first: the cache's own
    temporary files start so), no ``/`` or ``\\``, no control character (NUL, newline: the
    command line prints ids on one line), at most 255 bytes.
    """
    if not isinstance(case_id, str) or not case_id:
        problem = "must be a non-empty string"
    elif case_id.startswith("."):
        problem = "must not start with '.'"
    elif "/" in case_id or "\\" in case_id:
        problem = "must not contain '/' or '\\'"
    elif any(unicodedata.category(char) == "Cc" for char in case_id):
        problem = "must not contain control characters"
    elif len(os.fsencode(case_id)) > MAX_CASE_ID_BYTES:
        problem = f"must be at most {MAX_CASE_ID_BYTES} bytes long"
    else:
        return case_id
    raise InputError(source, f"case id {case_id!r} is not a plain name: it {problem}")


@dataclass(frozen=True)
class CaseFiles:
    """Where one case lives on disk, as listed by a reader before anything is loaded.

    The id is checked here, so that no reader can hand the cache an id that leaves its folder.
    """

    case_id: str
    image: Path
    label: Path | None
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        check_case_id(self.case_id, self.image)


@dataclass
class Volume:
    """One loaded case on its native grid.

    ``image`` is float32 of shape (X, Y, Z, C): 2-D slices are taken along axis 2 (Z), C is the
    number of input channels (1 for MRI, 3 for colour images). ``label`` is int16 of shape
    (X, Y, Z) with values already mapped to 0..n_classes-1, or None for an unlabelled case.
    ``spacing`` is the voxel size in millimetres along X, Y, Z.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    affine: np.ndarray
    source: Path

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[2])
