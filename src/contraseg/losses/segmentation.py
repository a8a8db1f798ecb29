"""Segmentation losses of the fine-tuning stage (method_spec 6.1).

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

Shapes: logits (B, K, H, W) float, target (B, H, W) long in 0..K-1; each loss returns a scalar,
computed in fp32 whatever the autocast dtype.

Reference: Chaitanya et al., NeurIPS 2020 (arXiv 2006.10511), official code's ``--dsc_loss``;
Milletari et al., V-Net, 3DV 2016 (soft Dice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SEGMENTATION_LOSSES = ("dice", "dice_fg", "ce", "dice_ce")
DICE_EPS = 1e-10

SegmentationLoss = Callable[[Tensor, Tensor], Tensor]


def _check(logits: Tensor, target: Tensor, labels: bool = True) -> None:
    """Shapes and dtypes; with ``labels`` also the label range, which waits for the device."""
    if logits.ndim != 4 or target.ndim != 3:
        raise ValueError(
            f"expected logits (B, K, H, W) and target (B, H, W), got {tuple(logits.shape)} "
            f"and {tuple(target.shape)}"
        )
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match target {tuple(target.shape)}")
    if target.dtype.is_floating_point:
        raise ValueError(f"target must hold integer labels, got dtype {target.dtype}")
    if labels and target.numel() and (target.min() < 0 or target.max() >= logits.shape[1]):
        raise ValueError(
            f"target labels must be in 0..{logits.shape[1] - 1}, got "
            f"{int(target.min())}..{int(target.max())}"
        )


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
    logits: Tensor, target: Tensor, include_background: bool = True, check_labels: bool = True
) -> Tensor:
    """1 - mean over images x classes of the soft Dice (module docstring).

    ``check_labels=False`` skips the label-range check, which waits for the device: for a
    training loop whose labels were checked once.
    """
    _check(logits, target, check_labels)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        probs = torch.softmax(logits.float(), dim=1)
        onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
        if not include_background:
            probs, onehot = probs[:, 1:], onehot[:, 1:]
        intersection = (probs * onehot).sum(dim=(2, 3))
        total = probs.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))
        return 1 - (2 * intersection / (total + DICE_EPS)).mean()


def weighted_cross_entropy(
    logits: Tensor,
    target: Tensor,
    class_weights: Sequence[float] | None = None,
    check_labels: bool = True,
) -> Tensor:
    """Mean over pixels of ``w[y] * -log softmax(logits)[y]``; unweighted if weights is None.
    ``check_labels`` as in :func:`soft_dice_loss`."""
    _check(logits, target, check_labels)
    if class_weights is not None and len(class_weights) != logits.shape[1]:
        raise ValueError(f"{len(class_weights)} class weights for {logits.shape[1]} classes")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        per_pixel = F.cross_entropy(logits.float(), target.long(), reduction="none")
        if class_weights is not None:
            weights = torch.as_tensor(class_weights, dtype=per_pixel.dtype, device=logits.device)
            per_pixel = per_pixel * weights[target.long()]
        return per_pixel.mean()


def segmentation_loss(
    name: str,
    num_classes: int,
    class_weights: Sequence[float] | None = None,
    check_labels: bool = True,
) -> SegmentationLoss:
    """The loss called ``name`` (``FinetuneConfig.loss``) as ``f(logits, target) -> scalar``.

    ``class_weights`` applies to the cross-entropy part; for ``"ce"`` it defaults to the
    official weights, for ``"dice_ce"`` to none. ``check_labels`` as in :func:`soft_dice_loss`.
    """
    if name not in SEGMENTATION_LOSSES:
        raise ValueError(
            f"unknown segmentation loss {name!r}; expected one of {SEGMENTATION_LOSSES}"
        )
    if class_weights is not None and len(class_weights) != num_classes:
        raise ValueError(f"{len(class_weights)} class weights for {num_classes} classes")
    if name == "dice":
        return lambda logits, target: soft_dice_loss(logits, target, True, check_labels)
    if name == "dice_fg":
        if num_classes < 2:
            raise ValueError("dice_fg needs at least one foreground class")
        return lambda logits, target: soft_dice_loss(logits, target, False, check_labels)
    if name == "ce":
        weights = official_class_weights(num_classes) if class_weights is None else class_weights
        return lambda logits, target: weighted_cross_entropy(logits, target, weights, check_labels)
    return lambda logits, target: (
        soft_dice_loss(logits, target, True, check_labels)
        + weighted_cross_entropy(logits, target, class_weights, check_labels)
    )
