"""The corruptions of the pretext-task baselines, as pure batch functions (docs/extensions.md).

- rotation (Gidaris et al., ICLR 2018): every image in its four rotations by k quarter turns,
  labelled k; k turns go from the first image axis (rows) towards the second (columns), as
  ``numpy.rot90`` and ``torch.rot90`` do.
- inpainting (Pathak et al., CVPR 2016): boxes of random size and position set to 0; the
  network restores the image inside them.
- context restoration (Chen et al., Medical Image Analysis 2019): pairs of equal square patches
  exchanged; the network restores the image. All the patches of one image are disjoint, so the
  corruption only moves pixels (it is a permutation; doing it twice restores the image).

As in ``contraseg.data.augment``, the random parameters are drawn on the CPU from the caller's
``torch.Generator`` by public ``sample_*`` functions, so tests can check exactly what was done,
and applied on the batch's device. The official code's unused helpers (``utils.py``) inspired
the defaults: boxes of 30 to 90 pixels and 10 swaps of 5 x 5 patches at 192 x 192.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROTATIONS = 4


def rotation_batch(images: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C, H, W) square images -> their 4B rotations and labels k (4B,): rows k*B..k*B+B-1
    hold every image turned by k quarter turns."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation needs square images, got {tuple(images.shape[-2:])}")
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


def _randint(high: Tensor, generator: torch.Generator) -> Tensor:
    """Integers uniform in 0..high-1, elementwise (``high`` >= 1, long, on the CPU)."""
    draws = torch.rand(high.shape, generator=generator, dtype=torch.float64)
    return torch.minimum((draws * high).long(), high - 1)


def sample_boxes(
    batch: int,
    size: tuple[int, int],
    boxes: int,
    fraction: tuple[float, float] | list[float],
    generator: torch.Generator,
) -> Tensor:
    """(B, boxes, 4) long (top, left, height, width): each side a uniform fraction of the image
    side in ``fraction`` (at least 1 pixel), the position uniform among those inside the image."""
    extent = torch.tensor(size, dtype=torch.float64)
    low, high = fraction
    sides = low + (high - low) * torch.rand(
        (batch, boxes, 2), generator=generator, dtype=torch.float64
    )
    sides = torch.minimum((sides * extent).round().long().clamp(min=1), extent.long())
    corners = _randint(extent.long() - sides + 1, generator)
    return torch.cat([corners, sides], dim=-1)


def box_mask(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W) bool: True inside any of the boxes (B, n, 4) of :func:`sample_boxes`."""
    rows = torch.arange(size[0], device=boxes.device)
    cols = torch.arange(size[1], device=boxes.device)
    top, left, height, width = boxes.unbind(-1)
    in_rows = (rows >= top[..., None]) & (rows < (top + height)[..., None])  # (B, n, H)
    in_cols = (cols >= left[..., None]) & (cols < (left + width)[..., None])  # (B, n, W)
    return (in_rows[..., :, None] & in_cols[..., None, :]).any(dim=1)


def inpaint(images: Tensor, mask: Tensor) -> Tensor:
    """Images (B, C, H, W) with the pixels of ``mask`` (B, H, W) set to 0."""
    return images.masked_fill(mask[:, None].to(images.device), 0)


def patch_side(size: tuple[int, int], fraction: float) -> int:
    """Side in pixels of a context-restoration patch: ``fraction`` of the shorter side, >= 1."""
    return max(1, round(fraction * min(size)))


def sample_swaps(
    batch: int, size: tuple[int, int], swaps: int, patch: int, generator: torch.Generator
) -> Tensor:
    """(B, swaps, 2, 2) long: the top-left (row, col) of the two patches of each swap.

    The patches of an image are 2 * ``swaps`` distinct cells of a grid of ``patch``-pixel
    cells whose origin is shifted by a random offset (0..patch-1 on each axis), so they are
    disjoint and may lie anywhere in the image.
    """
    height, width = size
    rows, cols = (height - patch + 1) // patch, (width - patch + 1) // patch
    # an offset up to patch-1 leaves room for `rows` cells when (rows + 1) * patch - 1 <= height
    cells = rows * cols
    if cells < 2 * swaps:
        raise ValueError(
            f"{swaps} swaps need {2 * swaps} disjoint {patch}x{patch} patches; a {height}x{width} "
            f"image holds {cells} on a shifted grid"
        )
    out = torch.empty((batch, swaps, 2, 2), dtype=torch.long)
    for b in range(batch):
        offset = torch.randint(0, patch, (2,), generator=generator)
        chosen = torch.randperm(cells, generator=generator)[: 2 * swaps]
        cell = torch.stack([chosen // cols, chosen % cols], dim=-1)  # (2 * swaps, 2)
        out[b] = (offset + cell * patch).view(swaps, 2, 2)
    return out


def swap_patches(images: Tensor, corners: Tensor, patch: int) -> Tensor:
    """Images (B, C, H, W) with the two patches of each swap in ``corners`` exchanged."""
    batch, channels, height, width = images.shape
    corners = corners.to(images.device)
    offsets = torch.arange(patch, device=images.device)
    rows = corners[..., 0, None, None] + offsets[:, None]  # (B, S, 2, P, 1)
    cols = corners[..., 1, None, None] + offsets[None, :]  # (B, S, 2, 1, P)
    flat = (rows * width + cols).flatten(3)  # (B, S, 2, P*P)
    first, second = flat[:, :, 0].reshape(batch, -1), flat[:, :, 1].reshape(batch, -1)
    source = torch.arange(height * width, device=images.device).repeat(batch, 1)
    source = source.scatter(1, first, second).scatter(1, second, first)
    moved = images.flatten(2).gather(2, source[:, None].expand(-1, channels, -1))
    return moved.view_as(images)
