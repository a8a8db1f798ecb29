"""Projection heads g1 (global) and g2 (local), and the local-region machinery of stage 2.

- :class:`GlobalHead` (g1, supplement 1.1): flatten e(x) -> Dense(hidden, no bias) -> ReLU ->
  Dense(out, no bias). No BN, as in the official code.
- :class:`LocalHead` (g2, supplement 1.1): 1x1 conv (no bias) + BN + ReLU, then a 1x1 conv
  (no bias, no BN, no activation), channels unchanged.
- :func:`official_region_grid` (the official code's ``models.py``): the fixed 5x5 grid of
  region corners, the 13 anchors and each anchor's 5 neighbouring negatives (optionally the
  official code's own lists for 1x1 regions).
- :func:`extract_regions`: KxK regions at given corners, flattened (not pooled), vectorised.
- :func:`region_points`, :func:`view_points`, :func:`sample_regions`, :func:`points_inside`:
  the same regions located in views that were cropped, scaled or flipped differently
  (``loss.views=transformed``, docs/local-views.md).
- :class:`RegionProjector`: the shared dense layer applied to every flattened region (the
  official ``wgt_en=1``, layer ``seg_pred``).
- :class:`LocalEmbedder`: g2 + region extraction + optional projector, d_l map -> (B, R, D).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contraseg.devices import to_device

# Grid coordinates (row, col) on the 5x5 grid g in {0..4}^2 (official ``models.py``). The
# anchors are the 9 points with both coordinates even and the 4 with both odd; the table gives
# 5 "nearby" negatives per anchor. Four negatives, (1,2) (2,1) (2,3) (3,2), are not anchors, so
# the region set is 17 regions: the 13 anchors first, then those four.
_ANCHORS: tuple[tuple[int, int], ...] = (
    (0, 0), (0, 2), (0, 4), (2, 0), (2, 2), (2, 4), (4, 0), (4, 2), (4, 4),
    (1, 1), (1, 3), (3, 1), (3, 3),
)  # fmt: skip
_NEGATIVES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((0, 2), (1, 1), (1, 2), (2, 0), (2, 1)),
    ((0, 0), (0, 4), (1, 1), (1, 3), (2, 2)),
    ((0, 2), (1, 2), (1, 3), (2, 3), (2, 4)),
    ((0, 0), (1, 1), (2, 2), (4, 0), (3, 1)),
    ((1, 1), (1, 3), (3, 1), (3, 3), (2, 0)),
    ((0, 4), (2, 2), (4, 4), (1, 3), (3, 3)),
    ((2, 0), (2, 1), (4, 2), (3, 1), (3, 2)),
    ((2, 2), (4, 0), (4, 4), (3, 1), (3, 3)),
    ((2, 3), (2, 4), (4, 2), (3, 3), (3, 2)),
    ((0, 0), (0, 2), (2, 0), (2, 2), (1, 3)),
    ((0, 2), (0, 4), (1, 1), (2, 2), (2, 4)),
    ((2, 0), (2, 2), (4, 0), (4, 2), (3, 3)),
    ((2, 2), (2, 4), (4, 2), (4, 4), (3, 1)),
)
# The official code's separate table for 1x1 regions (in its ``models.py``): the
# same 13 anchors, other negatives, all of them anchors themselves (so 13 regions, not 17).
_NEGATIVES_1X1: tuple[tuple[tuple[int, int], ...], ...] = (
    ((0, 2), (2, 0), (2, 2), (1, 1), (1, 3)),
    ((0, 0), (0, 4), (2, 2), (1, 1), (1, 3)),
    ((0, 2), (2, 2), (2, 4), (3, 1), (1, 3)),
    ((0, 0), (2, 2), (4, 0), (1, 1), (3, 1)),
    ((1, 1), (1, 3), (3, 1), (3, 3), (2, 0)),
    ((0, 4), (2, 2), (4, 4), (1, 3), (3, 3)),
    ((2, 0), (2, 2), (4, 2), (3, 1), (1, 1)),
    ((2, 2), (4, 0), (4, 4), (3, 1), (3, 3)),
    ((2, 2), (2, 4), (4, 2), (3, 3), (3, 1)),
    ((0, 0), (0, 2), (2, 0), (2, 2), (1, 3)),
    ((0, 2), (0, 4), (2, 2), (2, 4), (3, 3)),
    ((2, 0), (2, 2), (4, 0), (0, 2), (1, 1)),
    ((2, 2), (2, 4), (4, 2), (4, 4), (1, 3)),
)
_GRID_STEPS = 4  # grid coordinates 0..4
K1_LISTS = ("shared", "official")


class RegionGrid(NamedTuple):
    """Region corners and the official negatives.

    corners: (R, 2) long, top-left (row, col) pixels; rows 0..A-1 are the anchors.
    neg_index: (A, n_neg) long, indices into ``corners`` of each anchor's negatives.
    """

    corners: Tensor
    neg_index: Tensor


def official_region_grid(
    height: int, width: int, size: int = 3, k1_lists: str = "shared"
) -> RegionGrid:
    """The official fixed region grid for a ``height`` x ``width`` feature map (docs/training.md).

    Grid coordinate g maps to pixel ``int(g * span / 4)`` with ``span = W - K - 1``: the official
    ``int(g * (W - 4) / 4)`` for K = 3 ({0, 11, 22, 33, 44} at 48). Returns 17 regions (13
    anchors, then 4 negative-only regions) and a (13, 5) table.

    For K = 1, ``k1_lists`` chooses between two readings. ``"shared"`` keeps the 3x3 rule and
    table (the same one-pixel margin at the far edge: {0, 11, 23, 34, 46} at 48). ``"official"``
    is what the official code runs for 1x1 regions: ``span = W - 1`` ({0, 11, 23, 35, 47} at
    48), the same 13 anchors with their own 5 negatives each, all of them anchors, so 13
    regions. For K = 3 both are the official 3x3 grid.

    Raises ValueError if the map is too small for 5 distinct grid positions per axis.
    """
    if size < 1:
        raise ValueError(f"region size must be positive, got {size}")
    if k1_lists not in K1_LISTS:
        raise ValueError(f"k1_lists must be one of {K1_LISTS}, got {k1_lists!r}")
    official_1x1 = size == 1 and k1_lists == "official"
    margin = 0 if official_1x1 else 1
    span_h, span_w = height - size - margin, width - size - margin
    if min(span_h, span_w) < _GRID_STEPS:
        raise ValueError(
            f"feature map {height}x{width} is smaller than the region grid: {size}x{size} regions "
            f"on a 5x5 grid need at least {size + margin + _GRID_STEPS} pixels per side"
        )
    negatives = _NEGATIVES_1X1 if official_1x1 else _NEGATIVES
    extras = sorted({n for negs in negatives for n in negs} - set(_ANCHORS))
    points = list(_ANCHORS) + extras
    index = {p: i for i, p in enumerate(points)}
    corners = torch.tensor(
        [[int(r * span_h / _GRID_STEPS), int(c * span_w / _GRID_STEPS)] for r, c in points],
        dtype=torch.long,
    )
    neg_index = torch.tensor([[index[n] for n in negs] for negs in negatives], dtype=torch.long)
    return RegionGrid(corners, neg_index)


def extract_regions(fmap: Tensor, corners: Tensor, size: int) -> Tensor:
    """Flattened ``size`` x ``size`` regions of ``fmap`` at ``corners`` (top-left, row/col).

    Args:
        fmap: (B, C, H, W) feature map.
        corners: (R, 2) integer top-left corners.
        size: region side K.

    Returns:
        (B, R, C*K*K), each region flattened channel-major (c, row, col), gathered with one
        advanced-indexing call so that it costs the same for 13 regions or 2000.

    Corners on the CPU are checked against the map's size; corners already on a GPU are not,
    since reading them would wait for the device (:class:`LocalEmbedder` checks its own).
    """
    if fmap.ndim != 4:
        raise ValueError(f"fmap must be (B, C, H, W), got shape {tuple(fmap.shape)}")
    if corners.ndim != 2 or corners.shape[1] != 2 or corners.dtype.is_floating_point:
        raise ValueError(f"corners must be an integer (R, 2) tensor, got {tuple(corners.shape)}")
    if size < 1:
        raise ValueError(f"region size must be positive, got {size}")
    if corners.device.type == "cpu":  # checked where that needs no wait for the device
        check_regions_fit(region_extent(corners, size), fmap.shape[2], fmap.shape[3], size)
    return _gather_regions(fmap, corners, size)


def _gather_regions(fmap: Tensor, corners: Tensor, size: int) -> Tensor:
    """:func:`extract_regions` without its checks, for :class:`LocalEmbedder`, which checks its
    corners once: reading them every step would break a compiled graph (and, on a GPU, wait)."""
    corners = corners.to(device=fmap.device, dtype=torch.long)
    offsets = torch.arange(size, device=fmap.device)
    rows = (corners[:, 0, None] + offsets)[:, :, None]  # (R, K, 1)
    cols = (corners[:, 1, None] + offsets)[:, None, :]  # (R, 1, K)
    patches = fmap[:, :, rows, cols]  # (B, C, R, K, K)
    batch, channels, n_regions = fmap.shape[0], fmap.shape[1], corners.shape[0]
    return patches.permute(0, 2, 1, 3, 4).reshape(batch, n_regions, channels * size * size)


def region_extent(corners: Tensor, size: int) -> tuple[int, int, int]:
    """(smallest corner coordinate, rows, columns) that ``size`` x ``size`` regions at
    ``corners`` (R, 2) span; (0, 0, 0) for none."""
    if not corners.numel():
        return 0, 0, 0
    return int(corners.min()), int(corners[:, 0].max()) + size, int(corners[:, 1].max()) + size


def check_regions_fit(extent: tuple[int, int, int], height: int, width: int, size: int) -> None:
    """ValueError unless regions of :func:`region_extent` ``extent`` lie in a height x width map."""
    low, rows, cols = extent
    if low < 0 or rows > height or cols > width:
        raise ValueError(
            f"regions of size {size} at the given corners do not fit in the {height}x{width} map "
            f"(the feature map is smaller than the region grid)"
        )


def region_points(corners: Tensor, size: int, fmap_size: tuple[int, int]) -> Tensor:
    """Normalised (x, y) centres of the pixels of each ``size`` x ``size`` region, (R, K*K, 2).

    The convention is ``grid_sample``'s with ``align_corners=False``: pixel i of n sits at
    ``(2i + 1) / n - 1``. That is also where the centre of feature pixel i lies in the input
    image (each feature pixel covers 2^k input pixels), so the same points serve the feature
    map and the image it came from. Row-major within a region, as :func:`extract_regions`
    flattens. float64.
    """
    height, width = fmap_size
    corners = corners.to(torch.float64)
    offsets = torch.arange(size, dtype=torch.float64, device=corners.device)
    rows = (corners[:, 0, None] + offsets)[:, :, None].expand(-1, size, size)
    cols = (corners[:, 1, None] + offsets)[:, None, :].expand(-1, size, size)
    points = torch.stack([(2 * cols + 1) / width - 1, (2 * rows + 1) / height - 1], dim=-1)
    return points.reshape(corners.shape[0], size * size, 2)


def view_points(points: Tensor, theta: Tensor) -> Tensor:
    """Where each view shows ``points`` (R, P, 2) of the original image: (B, R, P, 2).

    ``theta`` (B, 2, 3) is the view's sampling transform (``augment.warp``): view point q shows
    original point ``A q + t``, so an original point p is at ``A^-1 (p - t)`` in the view.
    """
    theta = theta.to(torch.float64)
    # inverted where theta was drawn (the CPU: no wait for the GPU), applied where points are
    inverse = to_device(torch.linalg.inv(theta[:, :, :2]), points.device)
    shifted = points.to(torch.float64)[None] - to_device(theta[:, None, None, :, 2], points.device)
    return torch.einsum("bij,brpj->brpi", inverse, shifted)


def points_inside(points: Tensor, fmap_size: tuple[int, int]) -> Tensor:
    """(B, R) bool: every point of the region lies among the view's pixel centres.

    That is within ``1 - 1/n`` of the centre in normalised units, n the feature map's side, so
    that every sample interpolates between pixels of the view and none is a border copy.
    """
    height, width = fmap_size
    inside_x = points[..., 0].abs() <= 1 - 1 / width + 1e-9
    inside_y = points[..., 1].abs() <= 1 - 1 / height + 1e-9
    return (inside_x & inside_y).all(dim=-1)


def sample_regions(fmap: Tensor, points: Tensor) -> Tensor:
    """Regions of ``fmap`` (B, C, H, W) sampled bilinearly at ``points`` (B, R, K*K, 2).

    Returns (B, R, C*K*K) flattened channel-major like :func:`extract_regions`. Points outside
    the map take the border value (their regions are skipped by the loss anyway, see
    :func:`points_inside`); at pixel centres this is :func:`extract_regions` up to rounding.
    """
    if fmap.ndim != 4 or points.ndim != 4 or points.shape[0] != fmap.shape[0]:
        raise ValueError(
            f"fmap (B, C, H, W) and points (B, R, P, 2) must share B, got {tuple(fmap.shape)} "
            f"and {tuple(points.shape)}"
        )
    work = torch.float64 if fmap.dtype == torch.float64 else torch.float32
    grid = points.to(device=fmap.device, dtype=work)
    samples = F.grid_sample(
        fmap.to(work), grid, mode="bilinear", padding_mode="border", align_corners=False
    )  # (B, C, R, P)
    batch, channels, n_regions, n_points = samples.shape
    flat = samples.permute(0, 2, 1, 3).reshape(batch, n_regions, channels * n_points)
    return flat.to(fmap.dtype)


class GlobalHead(nn.Module):
    """g1: flatten -> Linear(in_features, hidden, no bias) -> [BatchNorm1d] -> ReLU ->
    Linear(hidden, out, no bias).

    ``in_features`` is e's flattened output, ``UNet.bottleneck_features(H, W)`` (4608 at 192).
    ``batch_norm``: the paper puts batch norm after every layer but the last ones (supplement
    1.1); the official code's g1 has none. Without it G^D's embeddings can collapse to one
    direction and stay there (docs/data.md, "G^D on the paper preset"): the norm removes the
    direction all slices share.
    """

    def __init__(
        self, in_features: int, hidden: int = 1024, out: int = 128, batch_norm: bool = True
    ) -> None:
        super().__init__()
        norm = [nn.BatchNorm1d(hidden)] if batch_norm else []
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden, bias=False),
            *norm,
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out, bias=False),
        )

    def forward(self, bottleneck: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, out); not normalised (the loss normalises)."""
        return self.net(bottleneck)


class LocalHead(nn.Sequential):
    """g2: 1x1 conv (no bias) + BN + ReLU, then a plain 1x1 conv (no bias); C -> C."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=1, bias=False),
        )


class RegionProjector(nn.Module):
    """Shared Linear(in_features, out, no bias) on every flattened region (official wgt_en)."""

    def __init__(self, in_features: int, out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out, bias=False)

    def forward(self, regions: Tensor) -> Tensor:
        """(B, R, in_features) -> (B, R, out)."""
        return self.linear(regions)


class LocalEmbedder(nn.Module):
    """d_l feature map -> region embeddings (B, R, D) for :func:`local_contrastive_loss`.

    g2, then :func:`extract_regions` at ``corners`` (or, given ``points``, :func:`sample_regions`
    there: the same regions in views that were transformed differently), then (if ``project``)
    the shared dense layer; D = ``out`` when projecting, else C*K*K. ``corners`` is a buffer so
    it follows the module across devices; it is not persistent, since it is derived from the
    config.
    """

    corners: Tensor

    def __init__(
        self, channels: int, corners: Tensor, size: int = 3, project: bool = True, out: int = 128
    ) -> None:
        super().__init__()
        self.size = size
        self.g2 = LocalHead(channels)
        self.projector = RegionProjector(channels * size * size, out) if project else None
        self.register_buffer("corners", corners.to(torch.long).clone(), persistent=False)
        # on the CPU now, so that forward checks the map's size without reading the device
        self.extent = region_extent(corners.cpu(), size)

    def forward(self, fmap: Tensor, points: Tensor | None = None) -> Tensor:
        features = self.g2(fmap)
        if points is None:
            check_regions_fit(self.extent, features.shape[2], features.shape[3], self.size)
            regions = _gather_regions(features, self.corners, self.size)
        else:
            regions = sample_regions(features, points)
        return regions if self.projector is None else self.projector(regions)
