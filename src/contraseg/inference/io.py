"""Reading scans to segment and writing label maps that overlay them exactly.

Input layouts (``contraseg predict -i``): one ``.nii``/``.nii.gz`` file; a folder of them (one
case per file, named by the file); or an nnU-Net ``imagesTs``-style folder in which every file is
``{case}_{XXXX}.nii.gz`` and the ``XXXX`` = 0000, 0001, ... files of a case are its channels.
A label map is written with the input's header: same shape (without the channel axis), affine,
qform/sform codes and voxel sizes, so that it overlays the scan in ITK-SNAP or 3D Slicer.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from contraseg import fileio
from contraseg.data.readers.nifti import load_nifti
from contraseg.errors import InputError

ENDINGS = (".nii.gz", ".nii")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class ScanFiles:
    """One case to segment: its name and its channel files (one file, or _0000, _0001...)."""

    name: str
    paths: tuple[Path, ...]


def nifti_stem(path: Path) -> str | None:
    """The file name without its NIfTI ending, or None for another file."""
    for ending in ENDINGS:
        if path.name.endswith(ending):
            return path.name[: -len(ending)]
    return None


def find_scans(source: Path) -> list[ScanFiles]:
    """The cases of a file or folder (see the module docstring); hidden files are skipped."""
    source = Path(source)
    if source.is_file():
        stem = nifti_stem(source)
        if stem is None:
            raise InputError(source, "not a NIfTI file (.nii or .nii.gz)")
        return [ScanFiles(stem, (source,))]
    if not source.is_dir():
        raise InputError(source, "no such file or folder")
    files = sorted(
        p for p in source.iterdir() if p.is_file() and not p.name.startswith(".") and nifti_stem(p)
    )
    if not files:
        raise InputError(source, "holds no .nii or .nii.gz files")
    matches = [_CHANNEL.match(nifti_stem(p) or "") for p in files]
    if not all(matches):
        return [ScanFiles(nifti_stem(p) or p.name, (p,)) for p in files]
    grouped: dict[str, dict[int, Path]] = {}
    for path, match in zip(files, matches, strict=True):
        assert match is not None
        grouped.setdefault(match["case"], {})[int(match["channel"])] = path
    scans = []
    for case, channels in sorted(grouped.items()):
        if sorted(channels) != list(range(len(channels))):
            first_gap = min(set(range(len(channels) + 1)) - set(channels))
            raise InputError(
                source / f"{case}_{first_gap:04d}.nii.gz",
                f"channel file missing: {case} has channels {sorted(channels)}",
            )
        scans.append(ScanFiles(case, tuple(channels[c] for c in sorted(channels))))
    return scans


@dataclass
class Scan:
    """A scan read from disk: the image as (X, Y, Z, C) float32, its grid and its header."""

    image: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    header: nib.Nifti1Header | nib.Nifti2Header
    source: Path


def _header(path: Path) -> nib.Nifti1Header:
    try:
        return nib.load(str(path)).header
    except Exception as err:  # nibabel raises many kinds for a damaged header
        raise InputError(path, f"cannot read NIfTI header: {str(err).splitlines()[0]}") from None


def read_scan(files: ScanFiles, in_channels: int, channel: int | None) -> Scan:
    """Read a case for a network of ``in_channels`` inputs.

    A 4-D image whose channel axis holds exactly ``in_channels`` channels is used whole; with
    ``channel`` set (a model trained on one channel of 4-D images, MSD Prostate's T2) that
    channel is kept. A 2-D image is one slice. Channel files must share one grid.
    """
    arrays = []
    affine0 = np.eye(4)
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
    for index, path in enumerate(files.paths):
        data, affine, zooms = load_nifti(path)
        if data.ndim == 2:
            data, zooms = data[:, :, None], (*zooms[:2], 1.0)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim == 4 and len(files.paths) == 1:
            if channel is not None and in_channels == 1:
                if channel >= data.shape[3]:
                    raise InputError(
                        path, f"has {data.shape[3]} channels; the model uses channel {channel}"
                    )
                data = data[..., channel]
            else:
                arrays = [data[..., c] for c in range(data.shape[3])]
        if data.ndim == 3:
            arrays.append(data)
        elif data.ndim != 4 or len(files.paths) > 1:
            raise InputError(path, f"expected a 3-D or 4-D image, got shape {tuple(data.shape)}")
        if not np.all(np.isfinite(data)):
            raise InputError(path, "holds NaN or infinite voxels")
        if index == 0:
            affine0, spacing = affine, zooms
        elif tuple(data.shape) != tuple(arrays[0].shape) or not np.allclose(
            affine, affine0, rtol=0, atol=1e-3 * max(1.0, float(np.abs(affine0).max()))
        ):
            raise InputError(path, f"is not on the grid of {files.paths[0].name}")
    if len(arrays) != in_channels:
        raise InputError(
            files.paths[0], f"has {len(arrays)} channel(s); the model takes {in_channels}"
        )
    if min(spacing[:3]) <= 0:
        raise InputError(files.paths[0], f"voxel sizes must be positive, got {spacing[:3]}")
    return Scan(
        image=np.stack(arrays, axis=-1).astype(np.float32, copy=False),
        affine=np.asarray(affine0, np.float64),
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        header=_header(files.paths[0]),
        source=files.paths[0],
    )


def label_dtype(label_values: tuple[int, ...]) -> type[np.unsignedinteger]:
    """uint8 when every label value fits, else uint16 (MM-WHS's raw values reach 850)."""
    return np.uint8 if max(label_values) <= 255 else np.uint16


def write_label_map(path: Path, labels: np.ndarray, header: nib.Nifti1Header) -> None:
    """Write ``labels`` (X, Y, Z) with the input's header (geometry and codes kept), atomically.

    gzip level 1: label maps are mostly background and compress well at any level, and the
    higher levels cost more time than the network on small volumes.
    """
    out_header = header.copy()
    out_header.set_data_dtype(labels.dtype)
    out_header.set_slope_inter(1.0, 0.0)
    out_header["cal_min"], out_header["cal_max"] = 0, float(labels.max(initial=0))
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(labels, None, out_header)
    image.set_qform(header.get_qform(), code=int(header["qform_code"]))
    image.set_sform(header.get_sform(), code=int(header["sform_code"]))
    data = image.to_bytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=1, mtime=0)
    fileio.write_bytes(path, data)
