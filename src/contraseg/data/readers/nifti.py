"""NIfTI loading with the checks every reader needs, each failing with the file's name."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from contraseg.errors import InputError


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Return (data as float32, affine 4x4, voxel spacing per axis) of a .nii or .nii.gz file.

    A missing, truncated or corrupt file raises :class:`InputError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile) as err:
        raise InputError(path, f"cannot read NIfTI file (truncated or corrupt?): {err}") from None
    except nib.filebasedimages.ImageFileError as err:
        raise InputError(
            path, f"not a readable NIfTI file (truncated or corrupt?): {err}"
        ) from None
    spacing = tuple(float(s) for s in img.header.get_zooms()[: data.ndim])
    return data, np.asarray(img.affine, dtype=np.float64), spacing


def check_finite(path: Path, data: np.ndarray) -> None:
    if not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise InputError(path, f"{bad} voxels are NaN or infinite")


def check_ndim(path: Path, data: np.ndarray, ndim: int = 3) -> None:
    if data.ndim != ndim:
        raise InputError(path, f"expected a {ndim}-D volume, got shape {tuple(data.shape)}")


def labels_to_int(path: Path, data: np.ndarray, allowed: set[int] | range) -> np.ndarray:
    """Round a label map stored as floats to int16 and check its values against ``allowed``."""
    rounded = np.rint(data)
    if not np.allclose(rounded, data, atol=1e-3):
        raise InputError(path, "label map has non-integer values")
    values = set(np.unique(rounded).astype(int).tolist())
    unexpected = sorted(values - set(allowed))
    if unexpected:
        raise InputError(
            path, f"label values {unexpected} are not in the dataset's set {sorted(allowed)}"
        )
    return rounded.astype(np.int16)
