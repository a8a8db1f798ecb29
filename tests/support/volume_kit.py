"""NIfTI writing and a smooth cardiac-like label map, for the data-layer tests
(``import volume_kit``; tests/support is on pytest's path)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def smooth_label(shape: tuple[int, int, int]) -> np.ndarray:
    """Concentric ellipses (LV in Myo, RV beside) shrinking along z: values 0..3."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    label = np.zeros(shape, np.int16)
    cx, cy = shape[0] / 2, shape[1] / 2
    for z in range(shape[2]):
        r = 0.3 * min(shape[:2]) * (1 - 0.5 * z / shape[2])
        d = ((x - cx) / 1.1) ** 2 + (y - cy) ** 2
        label[..., z][((x - cx + 1.3 * r) ** 2 + (y - cy) ** 2) < (0.7 * r) ** 2] = 1
        label[..., z][d < r**2] = 2
        label[..., z][d < (0.65 * r) ** 2] = 3
    return label
