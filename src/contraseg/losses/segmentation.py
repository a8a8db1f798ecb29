"""Segmentation losses of the fine-tuning stage (the official code's ``--dsc_loss``).

With ``p = softmax(logits)`` of shape (B, K, H, W) and ``y`` the one-hot target:

- soft Dice (``"dice"``, the official default ``--dsc_loss=2``, background included):

      dice = 1 - mean_{b, k} 2 * sum_{h,w} p*y / (sum_{h,w} p + sum_{h,w} y + eps),  eps = 1e-10

  sums per image and class, mean over images x classes; ``"dice_fg"`` averages over the
  foreground classes 1..K-1 only (``--dsc_loss=1``).
- weighted cross-entropy (``"ce"``, ``--dsc_loss=0``): mean over all pixels of
  ``w[y] * -log p[y]``. Divided by the number of pixels, not by ``sum w[y]`` as PyTorch's
  weighted ``cross_entropy`` does, so a batch's weight reflects its class composition; the
  default weights are the official ones (:func:`official_class_weights`).
- ``"dice_ce"``: soft Dice (with background) + cross-entropy, unweighted unless class weights
  are given (the usual nnU-Net / MONAI DiceCE convention).

Shapes: logits (B, K, H, W) float; target either (B, H, W) integer labels in 0..K-1 or
(B, K, H, W) float class probabilities per pixel (one-hot or soft, e.g. Mixup's mixed labels;
a one-hot target gives the integer path's value). ``ignore`` (B, H, W) bool, optional, marks
pixels that take no part (pseudo-labels below the confidence threshold): they count in neither
sum of the Dice, and the cross-entropy averages over the other pixels. Each loss returns a
scalar, computed in fp32 whatever the autocast dtype.

Reference: Chaitanya et al., NeurIPS 2020 (arXiv 2006.10511), official code's ``--dsc_loss``;
Milletari et al., V-Net, 3DV 2016 (soft Dice).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from contraseg.devices import to_device

SEGMENTATION_LOSSES = ("dice", "dice_fg", "ce", "dice_ce")
DICE_EPS = 1e-10
# Label value of a pixel that takes no part in the loss (pseudo-labels below the threshold).
IGNORE_LABEL = 255


class SegmentationLoss(Protocol):
    def __call__(self, logits: Tensor, target: Tensor, ignore: Tensor | None = None) -> Tensor: ...


def _check(logits: Tensor, target: Tensor, ignore: Tensor | None, labels: bool = True) -> None:
    """Shapes and dtypes; with ``labels`` also the label range, which waits for the device."""
    soft = target.dtype.is_floating_point
    if soft and target.ndim == 3:
        raise ValueError(
            f"target must hold integer labels (B, H, W) or class probabilities (B, K, H, W), "
            f"got dtype {target.dtype} of shape {tuple(target.shape)}"
        )
    if logits.ndim != 4 or target.ndim != (4 if soft else 3):
        raise ValueError(
            f"expected logits (B, K, H, W) and target (B, H, W) labels or (B, K, H, W) "
            f"probabilities, got {tuple(logits.shape)} and {tuple(target.shape)} {target.dtype}"
        )
    spatial = target.shape[2:] if soft else target.shape[1:]
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != spatial:
        raise ValueError(f"logits {tuple(logits.shape)} do not match target {tuple(target.shape)}")
    if soft and target.shape[1] != logits.shape[1]:
        raise ValueError(
            f"target has {target.shape[1]} class channels, logits {logits.shape[1]} classes"
        )
    if (
        labels
        and not soft
        and target.numel()
        and (target.min() < 0 or target.max() >= logits.shape[1])
    ):
        raise ValueError(
            f"target labels must be in 0..{logits.shape[1] - 1}, got "
            f"{int(target.min())}..{int(target.max())}"
        )
    if ignore is not None and (
        ignore.dtype != torch.bool or ignore.shape != (logits.shape[0], *logits.shape[2:])
    ):
        raise ValueError(
            f"ignore must be a bool (B, H, W) mask, got {ignore.dtype} {tuple(ignore.shape)}"
        )


def split_ignored(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Integer labels holding :data:`IGNORE_LABEL` -> (labels with 0 there, ignore mask)."""
    ignore = labels == IGNORE_LABEL
    return labels.masked_fill(ignore, 0), ignore


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """(B, H, W) integer labels -> (B, K, H, W) float32 one-hot."""
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()


def official_class_weights(num_classes: int) -> list[float]:
    """The official CE weights: ACDC 0.1/0.3x3, 3 classes 0.1/0.45x2, 8 classes 0.09/0.13x7.

    Other class counts get background 0.1 and the remaining 0.9 shared equally.
    """
    if num_classes < 2:
        raise ValueError(f"class weights need at least 2 classes, got {num_classes}")
    if num_classes == 8:
        return [0.09] + [0.13] * 7
    return [0.1] + [0.9 / (num_classes - 1)] * (num_classes - 1)


def soft_dice_loss(
    logits: Tensor,
    target: Tensor,
    include_background: bool = True,
    ignore: Tensor | None = None,
    check_labels: bool = True,
) -> Tensor:
    """1 - mean over images x classes of the soft Dice (module docstring).

    ``check_labels=False`` skips the label-range check, which waits for the device: for a
    training loop whose labels were checked once.
    """
    _check(logits, target, ignore, check_labels)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        probs = torch.softmax(logits.float(), dim=1)
        if target.dtype.is_floating_point:
            expected = target.float()
        else:
            expected = one_hot(target, logits.shape[1])
        if ignore is not None:
            keep = (~ignore)[:, None].to(probs.dtype)
            probs, expected = probs * keep, expected * keep
        if not include_background:
            probs, expected = probs[:, 1:], expected[:, 1:]
        intersection = (probs * expected).sum(dim=(2, 3))
        total = probs.sum(dim=(2, 3)) + expected.sum(dim=(2, 3))
        return 1 - (2 * intersection / (total + DICE_EPS)).mean()


def weighted_cross_entropy(
    logits: Tensor,
    target: Tensor,
    class_weights: Sequence[float] | None = None,
    ignore: Tensor | None = None,
    check_labels: bool = True,
) -> Tensor:
    """Mean over pixels of ``sum_k w[k] * y_k * -log softmax(logits)_k`` (``w[y] * -log p[y]``
    for integer labels); unweighted if weights is None; ignored pixels are left out.
    ``check_labels`` as in :func:`soft_dice_loss`."""
    _check(logits, target, ignore, check_labels)
    if class_weights is not None and len(class_weights) != logits.shape[1]:
        raise ValueError(f"{len(class_weights)} class weights for {logits.shape[1]} classes")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        weights = None
        if class_weights is not None:
            weights = to_device(torch.as_tensor(class_weights, dtype=torch.float32), logits.device)
        if target.dtype.is_floating_point:
            terms = -torch.log_softmax(logits.float(), dim=1) * target.float()
            if weights is not None:
                terms = terms * weights[:, None, None]
            per_pixel = terms.sum(dim=1)
        else:
            per_pixel = F.cross_entropy(logits.float(), target.long(), reduction="none")
            if weights is not None:
                per_pixel = per_pixel * weights[target.long()]
        if ignore is None:
            return per_pixel.mean()
        keep = (~ignore).to(per_pixel.dtype)
        return (per_pixel * keep).sum() / keep.sum().clamp(min=1)


def segmentation_loss(
    name: str,
    num_classes: int,
    class_weights: Sequence[float] | None = None,
    check_labels: bool = True,
) -> SegmentationLoss:
    """The loss called ``name`` (``FinetuneConfig.loss``) as ``f(logits, target, ignore=None)``.

    ``class_weights`` applies to the cross-entropy part; for ``"ce"`` it defaults to the
    official weights, for ``"dice_ce"`` to none. ``check_labels`` as in :func:`soft_dice_loss`.
    """
    if name not in SEGMENTATION_LOSSES:
        raise ValueError(
            f"unknown segmentation loss {name!r}; expected one of {SEGMENTATION_LOSSES}"
        )
    if class_weights is not None and len(class_weights) != num_classes:
        raise ValueError(f"{len(class_weights)} class weights for {num_classes} classes")
    if name == "dice_fg" and num_classes < 2:
        raise ValueError("dice_fg needs at least one foreground class")
    weights = class_weights
    if name == "ce" and weights is None:
        weights = official_class_weights(num_classes)

    def loss(logits: Tensor, target: Tensor, ignore: Tensor | None = None) -> Tensor:
        if name in ("dice", "dice_fg"):
            return soft_dice_loss(logits, target, name == "dice", ignore, check_labels)
        ce = weighted_cross_entropy(logits, target, weights, ignore, check_labels)
        if name == "ce":
            return ce
        return soft_dice_loss(logits, target, True, ignore, check_labels) + ce

    return loss
