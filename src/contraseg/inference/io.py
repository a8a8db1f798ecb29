"""Reading scans to segment and writing label maps that overlay them exactly.

Input layouts (``contraseg predict -i``): one ``.nii``/``.nii.gz`` file; a folder of them (one
case per file, named by the file); or an nnU-Net ``imagesTs``-style folder, in which the files
``{case}_0000``, ``{case}_0001``... of a case are its channels (docs/inference.md). A label map
is written with the input's header: the input's shape without its channel axis, the same
affine, qform/sform codes and voxel sizes, so that it overlays the scan in ITK-SNAP or 3D
Slicer; a NIfTI-2 input gives a NIfTI-2 label map.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from contraseg import fileio
from contraseg.data.readers.nifti import check_finite, load_nifti, read_nifti_header
from contraseg.data.readers.nnunet import check_same_grid, strip_ending
from contraseg.errors import InputError

ENDINGS = (".nii.gz", ".nii")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class ScanFiles:
    """One case to segment: its name and its channel files (one file, or _0000, _0001...).

    ``problem`` is set when the files cannot form a case (a channel file missing); reading
    the case then fails with it, so that the other cases of a folder are still predicted.
    """

    name: str
    paths: tuple[Path, ...]
    problem: str | None = None

    @property
    def ending(self) -> str:
        """The NIfTI ending of the input, which the label map keeps (``.nii.gz`` or ``.nii``)."""
        return ".nii.gz" if self.paths[0].name.endswith(".gz") else ".nii"


def nifti_stem(path: Path) -> str | None:
    """The file name without its NIfTI ending, or None for another file."""
    return strip_ending(path.name, ENDINGS)


def _case_name(stem: str) -> str:
    """nnU-Net's channel-0 file ``{case}_0000`` names the case ``{case}``."""
    match = _CHANNEL.match(stem)
    return match["case"] if match and match["channel"] == "0000" else stem


def find_scans(source: Path) -> list[ScanFiles]:
    """The cases of a file or folder, in name order; hidden and non-NIfTI files are skipped.

    In a folder, the files ``{case}_XXXX`` of a case that has a ``{case}_0000`` are its channels
    (nnU-Net's layout: channel k in ``_000k``); every other file is a case of its own, named by
    its stem. A single file ``{case}_0000`` is named ``{case}`` too, as nnU-Net names it.
    """
    source = Path(source)
    if source.is_file():
        stem = nifti_stem(source)
        if stem is None:
            raise InputError(source, "not a NIfTI file (.nii or .nii.gz)")
        return [ScanFiles(_case_name(stem), (source,))]
    if not source.is_dir():
        raise InputError(source, "no such file or folder")
    files = sorted(
        p for p in source.iterdir() if p.is_file() and not p.name.startswith(".") and nifti_stem(p)
    )
    if not files:
        raise InputError(source, "holds no .nii or .nii.gz files")
    groups: dict[str, dict[int, Path]] = {}
    for path in files:
        match = _CHANNEL.match(nifti_stem(path) or "")
        if match:
            groups.setdefault(match["case"], {})[int(match["channel"])] = path
    scans: dict[str, ScanFiles] = {}

    def add(scan: ScanFiles) -> None:
        if scan.name in scans:
            other = scans[scan.name].paths[0]
            raise InputError(scan.paths[0], f"names the same case '{scan.name}' as {other}")
        scans[scan.name] = scan

    grouped = {
        path for case, channels in groups.items() if 0 in channels for path in channels.values()
    }
    for case, channels in groups.items():
        if 0 not in channels:
            continue
        paths = tuple(channels[c] for c in sorted(channels))
        gaps = sorted(set(range(max(channels) + 1)) - set(channels))
        problem = None
        if gaps:
            problem = f"channel file {case}_{gaps[0]:04d} is missing (case {case})"
        add(ScanFiles(case, paths, problem))
    for path in files:
        if path not in grouped:
            add(ScanFiles(nifti_stem(path) or path.name, (path,)))
    return [scans[name] for name in sorted(scans)]


@dataclass
class Scan:
    """A scan read from disk: the image as (X, Y, Z, C) float32, its grid and its header.

    ``shape`` is the spatial shape as stored ((X, Y) for a 2-D image): the label map's shape.
    """

    image: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    header: nib.Nifti1Header
    shape: tuple[int, ...]
    source: Path


def _as_channels(path: Path, data: np.ndarray) -> np.ndarray:
    """(X, Y, Z, C) view of a 2-D, 3-D or 4-D image (a 2-D image is one slice)."""
    if data.ndim == 2:
        return data[:, :, None, None]
    if data.ndim == 3:
        return data[..., None]
    if data.ndim == 4:
        return data
    raise InputError(path, f"expected a 2-D, 3-D or 4-D image, got shape {tuple(data.shape)}")


def read_scan(files: ScanFiles) -> Scan:
    """Read a case: its channel files stacked as (X, Y, Z, C), or one file's channel axis.

    Channel files must be 2-D or 3-D (or 4-D with one channel) and lie on the grid of the
    first; every voxel must be finite. Which channels the model takes is the
    :class:`~contraseg.inference.Segmenter`'s decision.
    """
    if files.problem:
        raise InputError(files.paths[0], files.problem)
    arrays = []
    first = files.paths[0]
    affine0, spacing0, shape0 = np.eye(4), (1.0, 1.0, 1.0), ()
    for index, path in enumerate(files.paths):
        data, affine, zooms = load_nifti(path)
        check_finite(path, data)
        channels = _as_channels(path, data)
        if len(files.paths) > 1 and channels.shape[3] != 1:
            raise InputError(path, f"a channel file must hold one channel, got shape {data.shape}")
        if index == 0:
            shape0 = tuple(data.shape[: min(data.ndim, 3)])
            affine0, spacing0 = affine, (*zooms[:2], zooms[2] if data.ndim > 2 else 1.0)
        else:
            check_same_grid(path, channels.shape[:3], affine, arrays[0].shape[:3], affine0, first)
        arrays.append(channels)
    image = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=3)
    return Scan(
        image=np.ascontiguousarray(image, dtype=np.float32),
        affine=np.asarray(affine0, np.float64),
        spacing=(float(spacing0[0]), float(spacing0[1]), float(spacing0[2])),
        header=read_nifti_header(first),
        shape=shape0,
        source=first,
    )


def label_dtype(label_values: tuple[int, ...]) -> type[np.unsignedinteger]:
    """uint8 when every label value fits, else uint16 (MM-WHS's raw values reach 850)."""
    return np.uint8 if max(label_values) <= 255 else np.uint16


def write_label_map(path: Path, labels: np.ndarray, header: nib.Nifti1Header) -> None:
    """Write ``labels`` (the input's spatial shape) with the input's header, atomically.

    The header is copied, not rebuilt from an affine, so qform and sform (codes, quaternion,
    rows) and the voxel sizes stay exactly the input's, whichever of them are set; only the
    data type, the shape, the scaling and the display range change. gzip level 1: label maps
    are mostly background and compress well at any level, and the higher levels cost more time
    than the network on small volumes.
    """
    out = header.copy()
    out.set_data_dtype(labels.dtype)
    out.set_slope_inter(1.0, 0.0)
    out["cal_min"], out["cal_max"] = 0, float(labels.max(initial=0))
    out["vox_offset"] = 0  # nibabel places the voxels right after the header
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    data = image_class(labels, None, out).to_bytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=1, mtime=0)
    fileio.write_bytes(path, data)
