"""Slow, obviously-correct loop implementations of the contrastive losses and region extraction.

They follow the formulas in the docstrings of ``contraseg.losses.global_contrastive`` and
``local_contrastive`` literally, one Python loop per sum, so that the tests can compare the
vectorised losses against them and ``bench/bench_losses.py`` can measure the speed-up. They are
differentiable (torch scalar ops) but not meant for training. They live with the tests, outside
the installed package (``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _cos(x: Tensor, y: Tensor) -> Tensor:
    return torch.dot(x, y) / (x.norm() * y.norm())


def _same_partition_other_volume(a: int, k: int, vol: Sequence[int], part: Sequence[int]) -> bool:
    return part[a] == part[k] and vol[a] != vol[k]


def global_contrastive_loss_reference(
    z: Tensor,
    image_ids: Sequence[int],
    volume_ids: Sequence[int] | None = None,
    partition_ids: Sequence[int] | None = None,
    strategy: str = "GR",
    temperature: float = 0.1,
) -> Tensor:
    """Mean over ordered (anchor, positive) pairs of -log(e^s_ap / (e^s_ap + sum_N e^s_an))."""
    img = [int(i) for i in image_ids]
    vol = [int(i) for i in volume_ids] if volume_ids is not None else [0] * len(img)
    part = [int(i) for i in partition_ids] if partition_ids is not None else [0] * len(img)
    terms = []
    for a in range(len(img)):
        for p in range(len(img)):
            partner = _same_partition_other_volume(a, p, vol, part)
            positive = img[p] == img[a] or (strategy == "GD" and partner)
            if p == a or not positive:
                continue
            numerator = torch.exp(_cos(z[a], z[p]) / temperature)
            denominator = numerator
            for n in range(len(img)):
                partner_n = _same_partition_other_volume(a, n, vol, part)
                if n == a or img[n] == img[a]:
                    continue  # the anchor and its other views are never negatives
                if strategy in ("GD-", "GD") and partner_n:
                    continue  # removed (GD-) or positive (GD)
                denominator = denominator + torch.exp(_cos(z[a], z[n]) / temperature)
            terms.append(-torch.log(numerator / denominator))
    return torch.stack(terms).mean()


def nt_xent_reference(z: Tensor, temperature: float = 0.1) -> Tensor:
    """SimCLR NT-Xent (Chen et al. 2020, eq. 1) for rows [view1 of images 0..N-1, view2 of them].

    Mean over the 2N anchors of -log(exp(s_ap / t) / sum_{k != a} exp(s_ak / t)).
    """
    n = z.shape[0] // 2
    terms = []
    for a in range(2 * n):
        p = (a + n) % (2 * n)
        denominator = sum(torch.exp(_cos(z[a], z[k]) / temperature) for k in range(2 * n) if k != a)
        terms.append(-torch.log(torch.exp(_cos(z[a], z[p]) / temperature) / denominator))
    return torch.stack(terms).mean()


def extract_regions_reference(fmap: Tensor, corners: Tensor, size: int) -> Tensor:
    """(B, C, H, W) -> (B, R, C*K*K) by slicing one region of one image at a time."""
    out = []
    for b in range(fmap.shape[0]):
        row = []
        for r, c in corners.tolist():
            row.append(fmap[b, :, r : r + size, c : c + size].reshape(-1))
        out.append(torch.stack(row))
    return torch.stack(out)


def local_contrastive_loss_reference(
    embeddings: Tensor,
    image_ids: Sequence[int],
    volume_ids: Sequence[int] | None = None,
    partition_ids: Sequence[int] | None = None,
    strategy: str = "LR",
    neg_index: Tensor | None = None,
    temperature: float = 0.1,
) -> Tensor:
    """Mean over ordered image pairs (a, b) and anchors u of the term l(a, b, u) of
    :mod:`contraseg.losses.local_contrastive`.

    Negatives of u: ``neg_index[u]`` in both maps, or every region other than u in both maps.
    """
    img = [int(i) for i in image_ids]
    vol = [int(i) for i in volume_ids] if volume_ids is not None else [0] * len(img)
    part = [int(i) for i in partition_ids] if partition_ids is not None else [0] * len(img)
    n_regions = embeddings.shape[1]
    n_anchors = n_regions if neg_index is None else neg_index.shape[0]
    terms = []
    for a in range(len(img)):
        for b in range(len(img)):
            partner = _same_partition_other_volume(a, b, vol, part)
            if b == a or not (img[a] == img[b] or (strategy == "LD" and partner)):
                continue
            for u in range(n_anchors):
                if neg_index is None:
                    negs = [n for n in range(n_regions) if n != u]
                else:
                    negs = [int(n) for n in neg_index[u]]
                anchor = embeddings[a, u]
                numerator = torch.exp(_cos(anchor, embeddings[b, u]) / temperature)
                denominator = numerator
                for n in negs:
                    denominator = denominator + torch.exp(
                        _cos(anchor, embeddings[a, n]) / temperature
                    )
                    denominator = denominator + torch.exp(
                        _cos(anchor, embeddings[b, n]) / temperature
                    )
                terms.append(-torch.log(numerator / denominator))
    return torch.stack(terms).mean()
