"""Per-volume segmentation metrics on integer label volumes (docs/metrics.md).

The paper's score is 3-D Dice per foreground class on each test volume, averaged over the
foreground classes, then over the volumes; :func:`dice_per_class` gives the first step. HD95
(:func:`hd95_per_class`) is MONAI's 95th-percentile symmetric Hausdorff distance between the
surfaces of prediction and reference, in millimetres through the voxel spacing.

Empty-mask policy, per volume and foreground class:

=======================  ==========  ==========================================================
prediction / reference   Dice        HD95
=======================  ==========  ==========================================================
both empty               1.0         0.0 (nothing to find, nothing found)
exactly one empty        0.0         NaN (a distance to an empty surface is undefined)
=======================  ==========  ==========================================================

That is the medical datasets' rule (``absent="count_as_one"``). Cityscapes' is
``"leave_out"``: a class absent from both is not scored in that image (Dice and HD95 NaN), as
the official evaluation ignores classes that appear in neither (docs/metrics.md).

HD95 values are therefore summarised NaN-aware, together with the number of undefined cases:
:func:`summarise_hd95` does this so that no caller averages NaNs or silently drops them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from contraseg.data.readers.base import AbsentClasses

__all__ = ["HD95Summary", "dice_per_class", "hd95_per_class", "nanmean", "summarise_hd95"]


def _check_labels(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> None:
    """Fail early on inputs that would give a plausible but wrong score."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (background + 1), got {num_classes}")
    for name, volume in (("prediction", pred), ("reference", ref)):
        if not np.issubdtype(volume.dtype, np.integer):
            raise ValueError(f"{name} must hold integer labels, got dtype {volume.dtype}")
        if volume.size and (volume.min() < 0 or volume.max() >= num_classes):
            raise ValueError(
                f"{name} labels must lie in [0, {num_classes}), "
                f"got [{volume.min()}, {volume.max()}]"
            )


def dice_per_class(
    pred: np.ndarray, ref: np.ndarray, num_classes: int, absent: AbsentClasses = "count_as_one"
) -> np.ndarray:
    """Dice of each foreground class 1..num_classes-1 over the whole volume, shape (K-1,).

    Exactly one mask empty gives 0.0; both empty gives 1.0, or NaN (not scored) with
    ``absent="leave_out"``. Computed from one confusion matrix, so one pass over the volume
    whatever the number of classes.
    """
    _check_labels(pred, ref, num_classes)
    codes = ref.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    confusion = np.bincount(codes, minlength=num_classes**2).reshape(num_classes, num_classes)
    overlap = np.diag(confusion)[1:].astype(np.float64)
    total = (confusion.sum(axis=0) + confusion.sum(axis=1))[1:].astype(np.float64)
    fill = 1.0 if absent == "count_as_one" else np.nan
    return np.divide(2.0 * overlap, total, out=np.full_like(total, fill), where=total > 0)


def hd95_per_class(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    num_classes: int,
    absent: AbsentClasses = "count_as_one",
) -> np.ndarray:
    """HD95 in millimetres of each foreground class 1..num_classes-1, shape (K-1,).

    ``spacing`` is the voxel size along the array's axes, in the same order (X, Y, Z for a
    volume read from NIfTI). Both masks empty gives 0.0 (NaN, not scored, with
    ``absent="leave_out"``), exactly one empty gives NaN; MONAI is only called on classes
    present in both, so it never warns about empty masks. MONAI's HD95 is the larger of the two
    directed 95th percentiles of surface-voxel distances.
    """
    _check_labels(pred, ref, num_classes)
    if len(spacing) != pred.ndim or min(spacing) <= 0:
        raise ValueError(f"spacing needs {pred.ndim} positive values, got {list(spacing)}")
    out = np.zeros(num_classes - 1)
    for label in range(1, num_classes):
        in_pred, in_ref = pred == label, ref == label
        found, present = bool(in_pred.any()), bool(in_ref.any())
        if found != present or (absent == "leave_out" and not found):
            out[label - 1] = np.nan
        elif present:
            with warnings.catch_warnings():
                # MONAI 1.6 passes its own deprecated argument internally; nothing to act on.
                warnings.filterwarnings("ignore", ".*`always_return_as_numpy`", FutureWarning)
                distance = _hausdorff()(
                    torch.from_numpy(in_pred)[None, None],
                    torch.from_numpy(in_ref)[None, None],
                    include_background=True,  # the single channel is this foreground class
                    percentile=95,
                    spacing=[float(s) for s in spacing],
                )
            out[label - 1] = float(distance)
    return out


def _hausdorff() -> Any:
    """MONAI's ``compute_hausdorff_distance``, imported on first use: importing MONAI takes
    seconds, and every training command imports this module for validation."""
    from monai.metrics import compute_hausdorff_distance

    return compute_hausdorff_distance


@dataclass(frozen=True)
class HD95Summary:
    """NaN-aware HD95 over volumes, with the count of undefined (one-side-empty) cases."""

    mean: float  # per volume mean over defined classes, then mean over volumes that have any
    per_class: np.ndarray  # (K-1,) mean over the volumes where the class is defined
    undefined: int  # (volume, class) pairs where exactly one of prediction/reference is empty
    undefined_per_class: np.ndarray  # (K-1,) int


def nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """Mean of the non-NaN values along ``axis``; NaN where there are none (without warning)."""
    defined = ~np.isnan(values)
    count = defined.sum(axis=axis)
    total = np.where(defined, values, 0.0).sum(axis=axis)
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)


def summarise_hd95(per_volume: np.ndarray, scored: np.ndarray | None = None) -> HD95Summary:
    """Summarise (volumes, K-1) values of :func:`hd95_per_class` in the order used for Dice.

    ``scored`` (same shape, bool) marks the pairs that were scored at all; a NaN elsewhere is a
    class left out under ``absent="leave_out"`` and is not counted as undefined.
    """
    values = np.asarray(per_volume, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"expected (volumes, classes) values, got shape {values.shape}")
    undefined = np.isnan(values) if scored is None else np.isnan(values) & scored
    return HD95Summary(
        mean=float(nanmean(nanmean(values, axis=1), axis=0)),
        per_class=nanmean(values, axis=0),
        undefined=int(undefined.sum()),
        undefined_per_class=undefined.sum(axis=0),
    )
