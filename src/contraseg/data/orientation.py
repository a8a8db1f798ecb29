"""Voxel orders: how a reader turns a stored volume into slices along axis 2, and back.

``as_stored`` uses the array as it is (ACDC, the phantom, MSD Prostate, nnU-Net, as their
official pipelines do). ``closest_canonical`` permutes and flips the axes to the RAS+ voxel
order closest to the affine, as ``nibabel.as_closest_canonical`` does, so that axis 2 runs
toward superior and slices are (near-)axial whatever the acquisition (MM-WHS). Nothing is
resampled, and the affine changes with the axes so that every voxel keeps its world position;
:func:`from_canonical` undoes the permutation exactly, which is how a prediction made on the
canonical grid is written back on the input's grid.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

Orientation = Literal["as_stored", "closest_canonical"]
ORIENTATIONS: tuple[Orientation, ...] = ("as_stored", "closest_canonical")
_IDENTITY = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def to_canonical(
    data: np.ndarray, affine: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Permute/flip the first three axes to RAS+ voxel order; return the array, its affine and
    its spacing (permuted with the axes). Trailing axes (channels) are carried along."""
    ornt = io_orientation(affine)
    out = apply_orientation(data, ornt)
    new_affine = affine @ inv_ornt_aff(ornt, data.shape[:3])
    new_spacing = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(ornt):
        new_spacing[int(target)] = float(spacing[axis])
    return np.ascontiguousarray(out), new_affine, (new_spacing[0], new_spacing[1], new_spacing[2])


def from_canonical(data: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_canonical` for an array on the canonical grid of a volume whose
    stored affine is ``original_affine`` (first three axes spatial, trailing axes carried)."""
    back = ornt_transform(_IDENTITY, io_orientation(original_affine))
    return np.ascontiguousarray(apply_orientation(data, back))


def orient(
    data: np.ndarray, affine: np.ndarray, spacing: tuple[float, ...], rule: Orientation
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Apply a reader's orientation rule (see the module docstring)."""
    if rule == "closest_canonical":
        return to_canonical(data, affine, spacing)
    return data, affine, (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def unorient(data: np.ndarray, original_affine: np.ndarray, rule: Orientation) -> np.ndarray:
    """Undo :func:`orient` for an array on the oriented grid."""
    if rule == "closest_canonical":
        return from_canonical(data, original_affine)
    return data
