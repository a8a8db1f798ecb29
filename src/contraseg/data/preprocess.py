"""Preprocessing of one volume as in the paper (docs/data.md), and its exact inverse.

Steps, in order: optional N4 bias correction (SimpleITK, convergence threshold 0.001, 4 levels x
50 iterations, Otsu foreground mask); per-volume, per-channel p1/p99 normalisation ``(x - p1) /
(p99 - p1)`` without clipping (with ``data.normalise_mask`` the percentiles come from the
foreground only and the background is set to 0, see :func:`foreground_mask`); in-plane
resampling slice by slice to the target spacing (image bilinear, label nearest; never through-
plane); centre crop or zero-pad to the fixed size. The :class:`GridInfo` of each volume records
what is needed to map a prediction back onto the native grid: undo the crop/pad (background
outside), resize to the native in-plane shape, and for probabilities take the argmax after the
bilinear resize, as the paper does.

Resampling uses ``torch.nn.functional.interpolate`` with explicit output sizes (half-pixel
centres: ``bilinear`` with ``align_corners=False`` and ``nearest-exact``), so forward and
inverse resizes are each other's mirror image and sizes are exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from contraseg.config import DataConfig, validate
from contraseg.data.readers.base import Reader
from contraseg.data.readers.nifti import MAX_VOXELS
from contraseg.data.volume import Volume
from contraseg.errors import InputError


@dataclass(frozen=True)
class PreprocessParams:
    """Everything that decides the preprocessed arrays (recorded in the cache manifest)."""

    target_spacing: tuple[float, float]
    size: tuple[int, int]
    n4: bool
    percentiles: tuple[float, float]
    normalise_mask: NormaliseMask = "none"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def params_for(config: DataConfig, reader: Reader) -> PreprocessParams:
    """The config's values where given, else the reader's defaults. The config is validated
    here too (:func:`contraseg.config.validate`), for configs built in code rather than loaded."""
    validate(config, prefix="data.")
    spacing = reader.default_spacing if config.target_spacing is None else config.target_spacing
    size = reader.default_size if config.size is None else config.size
    low, high = config.percentiles
    return PreprocessParams(
        target_spacing=(float(spacing[0]), float(spacing[1])),
        size=(int(size[0]), int(size[1])),
        n4=bool(config.n4),
        percentiles=(float(low), float(high)),
        normalise_mask=config.normalise_mask,
    )


@dataclass(frozen=True)
class GridInfo:
    """How a preprocessed volume relates to its native grid (enough to invert preprocessing).

    Preprocessed pixel ``i`` along an in-plane axis is resampled pixel ``i - pad + crop``.
    """

    native_shape: tuple[int, int, int]  # X, Y, Z
    native_spacing: tuple[float, float, float]
    affine: tuple[tuple[float, ...], ...]  # 4 x 4
    resampled_shape: tuple[int, int]  # in-plane shape after resampling, before crop/pad
    crop: tuple[int, int]  # first resampled pixel kept
    pad: tuple[int, int]  # zero pixels added before
    size: tuple[int, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "native_shape": list(self.native_shape),
            "native_spacing": list(self.native_spacing),
            "affine": [list(row) for row in self.affine],
            "resampled_shape": list(self.resampled_shape),
            "crop": list(self.crop),
            "pad": list(self.pad),
            "size": list(self.size),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> GridInfo:
        return cls(
            native_shape=tuple(int(v) for v in obj["native_shape"]),  # type: ignore[arg-type]
            native_spacing=tuple(float(v) for v in obj["native_spacing"]),  # type: ignore[arg-type]
            affine=tuple(tuple(float(v) for v in row) for row in obj["affine"]),
            resampled_shape=tuple(int(v) for v in obj["resampled_shape"]),  # type: ignore[arg-type]
            crop=tuple(int(v) for v in obj["crop"]),  # type: ignore[arg-type]
            pad=tuple(int(v) for v in obj["pad"]),  # type: ignore[arg-type]
            size=tuple(int(v) for v in obj["size"]),  # type: ignore[arg-type]
        )


def n4_correct(image: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """N4 bias correction of one (X, Y, Z) channel with the paper's settings."""
    import SimpleITK as sitk

    itk = sitk.GetImageFromArray(np.ascontiguousarray(image.transpose(2, 1, 0), np.float32))
    itk.SetSpacing([float(s) for s in spacing])
    mask = sitk.OtsuThreshold(itk, 0, 1, 200)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetConvergenceThreshold(0.001)
    corrector.SetMaximumNumberOfIterations([50] * 4)
    corrected = corrector.Execute(itk, mask)
    return sitk.GetArrayFromImage(corrected).transpose(2, 1, 0).astype(np.float32)


NormaliseMask = Literal["none", "nonzero", "otsu"]
NORMALISE_MASKS: tuple[NormaliseMask, ...] = get_args(NormaliseMask)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that maximises the between-class variance of ``values`` (Otsu, 1979)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.min() == finite.max():
        return float(finite.min()) if finite.size else 0.0
    counts, edges = np.histogram(finite, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts).astype(np.float64)
    mean = np.cumsum(counts * centres)
    total, total_mean = weight[-1], mean[-1]
    background = weight[:-1]
    foreground = total - background
    between = (total_mean * background / total - mean[:-1]) ** 2 / (background * foreground)
    between[(background == 0) | (foreground == 0)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def foreground_mask(image: np.ndarray, mode: NormaliseMask) -> np.ndarray | None:
    """The (X, Y, Z) foreground of an (X, Y, Z, C) image, or None for ``"none"``.

    ``nonzero``: voxels where any channel is not 0 (skull-stripped or masked scans, nnU-Net's
    ``use_mask_for_norm``); ``otsu``: channel 0 above its Otsu threshold. Either way only the
    largest connected region is kept, with its holes filled, so that a frame, a burnt-in
    annotation or noise outside the body does not count. An empty result falls back to the
    whole volume.
    """
    if mode == "none":
        return None
    if mode == "nonzero":
        raw = np.any(image != 0, axis=-1)
    else:
        raw = image[..., 0] > otsu_threshold(image[..., 0])
    regions, count = ndimage.label(raw)
    if count == 0:
        return np.ones(image.shape[:3], bool)
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(regions == int(np.argmax(sizes)))


def normalise(
    image: np.ndarray, percentiles: tuple[float, float], mask: np.ndarray | None = None
) -> np.ndarray:
    """``(x - p_low) / (p_high - p_low)`` per channel of (X, Y, Z, C); no clipping.

    With a ``mask`` the percentiles are taken inside it and the voxels outside are set to 0, as
    nnU-Net does for masked normalisation. A constant channel (p_high == p_low) is only
    shifted, so it becomes 0 instead of NaN.
    """
    out = np.empty_like(image, dtype=np.float32)
    for c in range(image.shape[-1]):
        channel = image[..., c]
        low, high = np.percentile(channel if mask is None else channel[mask], percentiles)
        scale = high - low if high > low else 1.0
        out[..., c] = (channel - low) / scale
    if mask is not None:
        out[~mask] = 0.0
    return out


@dataclass(frozen=True)
class IntensityProfile:
    """What tells a skull-stripped (or masked) scan from one that is not, before normalising:
    the share of the volume in its largest non-zero region (about 1 for a scan with noise
    everywhere, the organ's share for a masked one)."""

    foreground_fraction: float

    @classmethod
    def of(cls, image: np.ndarray) -> IntensityProfile:
        return cls(float(np.mean(foreground_mask(image, "nonzero"))))

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)


# differences smaller than these are never unusual, however alike the reference cases are
PROFILE_TOLERANCE = {"foreground_fraction": 0.1}


def unusual_intensity(
    profile: IntensityProfile, references: Sequence[IntensityProfile]
) -> str | None:
    """A one-line description of how ``profile`` lies far outside ``references`` (the training
    cases), or None. Far: more than 3 spreads from their median, the spread being 1.4826 MAD
    but at least :data:`PROFILE_TOLERANCE`."""
    if not references:
        return None
    problems = []
    for name, tolerance in PROFILE_TOLERANCE.items():
        values = np.array([getattr(r, name) for r in references])
        centre = float(np.median(values))
        spread = max(1.4826 * float(np.median(np.abs(values - centre))), tolerance)
        value = getattr(profile, name)
        if abs(value - centre) > 3 * spread:
            problems.append(f"{name.replace('_', ' ')} {value:.2f} vs {centre:.2f}")
    if not problems:
        return None
    return (
        f"intensities unlike the training cases' ({'; '.join(problems)}): is one skull-stripped "
        "or masked and the other not? Consider data.normalise_mask (docs/own-data.md)"
    )


def _resampled_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, float]
) -> tuple[int, int]:
    return tuple(  # type: ignore[return-value]
        max(1, round(n * s / t)) for n, s, t in zip(shape[:2], spacing[:2], target, strict=True)
    )


def _resize(stack: np.ndarray, shape: tuple[int, int], mode: str) -> np.ndarray:
    """Resize the last two axes of (Z, C, H, W) to ``shape``: one slice at a time, in-plane."""
    if tuple(stack.shape[-2:]) == tuple(shape):
        return stack
    tensor = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(tensor, size=shape, mode=mode, **kwargs).numpy()


def _crop_offsets(resampled: int, size: int) -> tuple[int, int]:
    """(crop, pad) that centre a ``resampled``-long axis in ``size`` pixels."""
    if resampled >= size:
        return (resampled - size) // 2, 0
    return 0, (size - resampled) // 2


def _place(
    src: np.ndarray, dst: np.ndarray, src_start: tuple[int, int], dst_start: tuple[int, int]
) -> None:
    """Copy the overlap of ``src`` (from src_start) into ``dst`` (from dst_start), last two axes."""
    n = [min(src.shape[-2 + a] - src_start[a], dst.shape[-2 + a] - dst_start[a]) for a in range(2)]
    dst[..., dst_start[0] : dst_start[0] + n[0], dst_start[1] : dst_start[1] + n[1]] = src[
        ..., src_start[0] : src_start[0] + n[0], src_start[1] : src_start[1] + n[1]
    ]


def check_resampled_size(
    volume: Volume, target_spacing: tuple[float, float], values_per_voxel: int
) -> None:
    """Refuse a volume whose in-plane resampling would need more memory than the largest image
    a reader accepts (:data:`contraseg.data.readers.nifti.MAX_VOXELS`): a damaged voxel size
    (1e6 mm) would otherwise ask for terabytes."""
    x, y, z = volume.image.shape[:3]
    pixels = (x * volume.spacing[0] / target_spacing[0]) * (
        y * volume.spacing[1] / target_spacing[1]
    )
    values = pixels * z * values_per_voxel
    if values > MAX_VOXELS:
        raise InputError(
            volume.source,
            f"voxel size {volume.spacing[0]:.4g} x {volume.spacing[1]:.4g} mm resampled to "
            f"{target_spacing[0]:.4g} x {target_spacing[1]:.4g} mm would need {values:.3g} "
            f"values (more than {MAX_VOXELS:.3g}): is the voxel size in the header right?",
        )


def preprocess_volume(
    volume: Volume, params: PreprocessParams
) -> tuple[np.ndarray, np.ndarray | None, GridInfo]:
    """(image (Z, C, H, W) float32, label (Z, H, W) uint8 or None, grid) of one volume."""
    check_resampled_size(volume, params.target_spacing, volume.image.shape[3])
    image = volume.image
    if params.n4:
        image = np.stack(
            [n4_correct(image[..., c], volume.spacing) for c in range(image.shape[-1])], axis=-1
        )
    image = normalise(image, params.percentiles, foreground_mask(image, params.normalise_mask))
    shape = _resampled_shape(image.shape, volume.spacing, params.target_spacing)
    crop_pad = [_crop_offsets(r, s) for r, s in zip(shape, params.size, strict=True)]
    crop = (crop_pad[0][0], crop_pad[1][0])
    pad = (crop_pad[0][1], crop_pad[1][1])
    n_slices = image.shape[2]

    stack = _resize(image.transpose(2, 3, 0, 1), shape, "bilinear")
    out = np.zeros((n_slices, image.shape[3], *params.size), np.float32)
    _place(stack, out, crop, pad)
    label = None
    if volume.label is not None:
        lab = _resize(volume.label.transpose(2, 0, 1)[:, None], shape, "nearest-exact")
        lab_out = np.zeros((n_slices, 1, *params.size), np.uint8)
        _place(np.rint(lab).astype(np.uint8), lab_out, crop, pad)
        label = lab_out[:, 0]
    grid = GridInfo(
        native_shape=tuple(int(n) for n in image.shape[:3]),  # type: ignore[arg-type]
        native_spacing=tuple(float(s) for s in volume.spacing),  # type: ignore[arg-type]
        affine=tuple(tuple(float(v) for v in row) for row in np.asarray(volume.affine)),
        resampled_shape=shape,
        crop=crop,
        pad=pad,
        size=params.size,
    )
    return out, label, grid


def _check_shape(array: np.ndarray, grid: GridInfo, ndim: int) -> None:
    expected_tail = tuple(grid.size)
    if array.ndim != ndim or array.shape[0] != grid.native_shape[2]:
        raise ValueError(f"expected {ndim}-D with {grid.native_shape[2]} slices, got {array.shape}")
    if tuple(array.shape[-2:]) != expected_tail:
        raise ValueError(f"expected in-plane size {expected_tail}, got {array.shape[-2:]}")


def probabilities_to_native(probs: np.ndarray, grid: GridInfo) -> np.ndarray:
    """Class probabilities (Z, K, H, W) -> (X, Y, Z, K) float32 on the native grid.

    Outside the cropped window the background probability is 1; probabilities are resized
    bilinearly to the native in-plane shape, where the argmax is then taken (as the official
    code's ``f1_utils.py`` does).
    """
    _check_shape(probs, grid, 4)
    z, k = probs.shape[:2]
    full = np.zeros((z, k, *grid.resampled_shape), np.float32)
    full[:, 0] = 1.0
    _place(np.asarray(probs, np.float32), full, grid.pad, grid.crop)
    return _resize(full, grid.native_shape[:2], "bilinear").transpose(2, 3, 0, 1)


def labels_to_native(labels: np.ndarray, grid: GridInfo) -> np.ndarray:
    """Label map (Z, H, W) -> (X, Y, Z) int16 on the native grid (nearest neighbour)."""
    _check_shape(labels, grid, 3)
    full = np.zeros((labels.shape[0], 1, *grid.resampled_shape), np.float32)
    _place(np.asarray(labels, np.float32)[:, None], full, grid.pad, grid.crop)
    native = _resize(full, grid.native_shape[:2], "nearest-exact")
    return np.rint(native[:, 0]).astype(np.int16).transpose(1, 2, 0)
