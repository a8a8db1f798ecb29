"""The in-memory form of one case, shared by every reader."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class CaseFiles:
    """Where one case lives on disk, as listed by a reader before anything is loaded."""

    case_id: str
    image: Path
    label: Path | None
    extra: dict[str, str] = field(default_factory=dict, compare=False)


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
