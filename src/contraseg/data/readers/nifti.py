"""NIfTI loading with the checks every reader needs, each failing with the file's name.

A file is read in full, once, before nibabel parses it: a ``.nii.gz`` through Python's gzip
module, which checks the CRC-32 and length stored at the end of the stream (nibabel reads only
as far as the voxels need and never looks at them, so a flipped bit inside the compressed data
used to pass unnoticed); the same bytes then feed nibabel. Before any voxel is read the header
is checked, so that a corrupt one gives a one-line error instead of an exception or a huge
allocation:

- ``sizeof_hdr`` is 348 (NIfTI-1) or 540 (NIfTI-2), in either byte order;
- 1 to 7 dimensions, each at least 1, and at most :data:`MAX_VOXELS` voxels in all;
- a grey-level voxel type (bool, integer or float): RGB and complex images are refused;
- a finite, non-zero voxel size along each spatial axis that the image has (nibabel would set
  a zero silently to 1 mm, which resamples the image wrongly; a negative size is taken as its
  absolute value, as nibabel does, since the sign is a direction the affine already holds);
- the voxel data start after the header, and the file holds exactly as many bytes as the header
  declares (up to :data:`TRAILING_BYTES` more are tolerated and ignored);
- nibabel's own header checks pass; its fixes and warnings go to the debug log.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import zlib
from pathlib import Path
from typing import IO

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError

from contraseg.data.readers.base import quiet
from contraseg.errors import InputError
from contraseg.fileio import one_line

MAX_VOXELS = 2**30  # 4 GiB as float32; a 512 x 512 x 2000 CT has 2**29
TRAILING_BYTES = 2**20
_HEADER_BYTES = 540  # NIfTI-2; a NIfTI-1 header is 348
_CHUNK = 2**24
_CLASSES: dict[int, type[nib.Nifti1Image]] = {348: nib.Nifti1Image, 540: nib.Nifti2Image}


def _open(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed when its name ends in ``.gz`` (as nibabel decides)."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _parse_header(path: Path, head: bytes) -> tuple[type[nib.Nifti1Image], nib.Nifti1Header, int]:
    """(image class, checked header, bytes the file must hold) from the file's first bytes."""
    sizes = {struct.unpack(f"{order}i", head[:4])[0] for order in "<>"} if len(head) >= 4 else ()
    klass = next((_CLASSES[s] for s in sorted(sizes) if s in _CLASSES), None)
    if klass is None:
        raise InputError(path, "not a NIfTI file (no NIfTI-1 or NIfTI-2 header)")
    header_size = 348 if klass is nib.Nifti1Image else 540
    if len(head) < header_size:
        raise InputError(path, f"truncated: {len(head)} bytes, less than a NIfTI header")
    header = klass.header_class(head[:header_size], check=False)
    dim = [int(d) for d in header["dim"]]
    ndim = dim[0]
    if not 1 <= ndim <= 7 or min(dim[1 : ndim + 1]) < 1:
        raise InputError(path, f"corrupt header: dim {dim} is not 1 to 7 sizes of at least 1")
    shape = dim[1 : ndim + 1]
    voxels = math.prod(shape)
    if voxels > MAX_VOXELS:
        raise InputError(
            path, f"header declares {shape} = {voxels:.3g} voxels, more than {MAX_VOXELS:.3g}"
        )
    try:
        dtype = header.get_data_dtype()
    except (HeaderDataError, KeyError):
        raise InputError(path, f"corrupt header: unknown datatype {header['datatype']}") from None
    if dtype.kind not in "biuf":
        name = header.get_value_label("datatype")
        raise InputError(
            path, f"voxel type {name} is not supported: images hold grey levels (int or float)"
        )
    pixdim = [float(p) for p in header["pixdim"][1 : min(ndim, 3) + 1]]
    if not all(math.isfinite(p) and p != 0 for p in pixdim):
        raise InputError(path, f"voxel size (pixdim) {pixdim} must be finite and non-zero")
    offset = float(header["vox_offset"])
    if not math.isfinite(offset) or not header_size <= offset <= 2**31:
        raise InputError(path, f"corrupt header: voxel data offset {offset:g}")
    try:
        with quiet(path):
            header.check_fix()  # nibabel's checks; its fixes (e.g. |pixdim|) go to the debug log
    except Exception as err:  # nibabel parses untrusted bytes and raises many types
        raise InputError(path, f"corrupt header: {one_line(err)}") from None
    return klass, header, int(offset) + voxels * dtype.itemsize


def _read_failure(path: Path, err: BaseException) -> InputError:
    return InputError(path, f"cannot read NIfTI file (truncated or corrupt?): {one_line(err)}")


def read_nifti_header(path: Path) -> nib.Nifti1Header:
    """The checked header of a NIfTI file, reading only its first bytes (to list a dataset)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with _open(path) as handle:
            head = handle.read(_HEADER_BYTES)
    except (OSError, EOFError, zlib.error) as err:
        raise _read_failure(path, err) from None
    return _parse_header(path, head)[1]


def _read_checked(path: Path) -> tuple[type[nib.Nifti1Image], io.BytesIO]:
    """The whole (decompressed) file in memory, its gzip CRC and its size checked."""
    buffer = io.BytesIO()
    try:
        with _open(path) as handle:
            head = handle.read(_HEADER_BYTES)
            klass, _, size = _parse_header(path, head)
            buffer.write(head)
            limit = size + TRAILING_BYTES
            # to the end of the stream, where gzip checks CRC and length; never past ``limit``
            while chunk := handle.read(min(_CHUNK, limit + 1 - buffer.tell())):
                buffer.write(chunk)
                if buffer.tell() > limit:
                    raise InputError(path, f"holds more than the {size} bytes its header declares")
    except (OSError, EOFError, zlib.error) as err:
        raise _read_failure(path, err) from None
    if buffer.tell() < size:
        raise InputError(
            path, f"truncated: the header declares {size} bytes, the file holds {buffer.tell()}"
        )
    buffer.seek(0)
    return klass, buffer


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Return (data as float32, affine 4x4, voxel spacing per axis) of a .nii or .nii.gz file.

    A missing, truncated or corrupt file, or an unusable header, raises :class:`InputError`
    naming it (the checks of the module docstring).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    klass, buffer = _read_checked(path)
    try:
        with quiet(path):
            img = klass.from_stream(buffer)
            data = np.asarray(img.dataobj, dtype=np.float32)
            affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # nibabel parses untrusted bytes and raises many types
        raise _read_failure(path, err) from None
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "corrupt header: the affine has NaN or infinite entries")
    spacing = tuple(float(s) for s in img.header.get_zooms()[: data.ndim])
    return data, affine, spacing


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
