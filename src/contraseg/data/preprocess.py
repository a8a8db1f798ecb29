"""Preprocessing of one volume as in the paper (method_spec section 5), and its exact inverse.

Steps, in order: optional N4 bias correction (SimpleITK, convergence threshold 0.001, 4 levels
x 50 iterations, Otsu foreground mask); per-volume, per-channel p1/p99 normalisation
``(x - p1) / (p99 - p1)`` without clipping; in-plane resampling slice by slice to the target
spacing (image bilinear, label nearest; never through-plane); centre crop or zero-pad to the
fixed size. The :class:`GridInfo` of each volume records what is needed to map a prediction back
onto the native grid: undo the crop/pad (background outside), resize to the native in-plane
shape, and for probabilities take the argmax after the bilinear resize, as the paper does.

Resampling uses ``torch.nn.functional.interpolate`` with explicit output sizes (half-pixel
centres: ``bilinear`` with ``align_corners=False`` and ``nearest-exact``), so forward and
inverse resizes are each other's mirror image and sizes are exact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from contraseg.config import DataConfig
from contraseg.data.readers.base import Reader
from contraseg.data.volume import Volume
from contraseg.errors import InputError


@dataclass(frozen=True)
class PreprocessParams:
    """Everything that decides the preprocessed arrays (recorded in the cache manifest)."""

    target_spacing: tuple[float, float]
    size: tuple[int, int]
    n4: bool
    percentiles: tuple[float, float]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def params_for(config: DataConfig, reader: Reader) -> PreprocessParams:
    """The config's values where given, else the reader's defaults; bad values name the key."""
    spacing = reader.default_spacing if config.target_spacing is None else config.target_spacing
    size = reader.default_size if config.size is None else config.size
    if len(spacing) != 2 or min(spacing) <= 0:
        raise InputError(
            "data.target_spacing", f"needs 2 positive in-plane values, got {list(spacing)}"
        )
    if len(size) != 2 or min(size) < 1:
        raise InputError("data.size", f"needs 2 positive in-plane sizes, got {list(size)}")
    p = config.percentiles
    if len(p) != 2 or not 0 <= p[0] < p[1] <= 100:
        raise InputError("data.percentiles", f"needs [low, high] with 0 <= low < high <= 100: {p}")
    return PreprocessParams(
        target_spacing=(float(spacing[0]), float(spacing[1])),
        size=(int(size[0]), int(size[1])),
        n4=bool(config.n4),
        percentiles=(float(p[0]), float(p[1])),
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


def normalise(image: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """``(x - p_low) / (p_high - p_low)`` per channel of (X, Y, Z, C); no clipping.

    A constant channel (p_high == p_low) is only shifted, so it becomes 0 instead of NaN.
    """
    out = np.empty_like(image, dtype=np.float32)
    for c in range(image.shape[-1]):
        low, high = np.percentile(image[..., c], percentiles)
        scale = high - low if high > low else 1.0
        out[..., c] = (image[..., c] - low) / scale
    return out


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


def preprocess_volume(
    volume: Volume, params: PreprocessParams
) -> tuple[np.ndarray, np.ndarray | None, GridInfo]:
    """(image (Z, C, H, W) float32, label (Z, H, W) uint8 or None, grid) of one volume."""
    image = volume.image
    if params.n4:
        image = np.stack(
            [n4_correct(image[..., c], volume.spacing) for c in range(image.shape[-1])], axis=-1
        )
    image = normalise(image, params.percentiles)
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
    bilinearly to the native in-plane shape, where the argmax is then taken (method_spec 6.3).
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
