"""Local contrastive loss with the strategies L^R and L^D (Chaitanya et al. 2020; docs/training.md).

Input: region embeddings ``f`` of shape (B, R, D), row b being R regions of the feature map
g2(d_l(e(x_b))) taken at the same corners in every image (``LocalEmbedder``). Two images a, b
form an ordered **pair** when b is a positive image of a:

- ``"LR"``: b is another view of a's image (same image id; the views differ by intensity
  augmentation only, so region u of one matches region u of the other).
- ``"LD"``: also any view of the same partition in another volume.

For a pair (a, b) and an anchor region u, with ``s(x, y) = cos(x, y) / tau``:

    den(a, b, u) = exp(s(f_au, f_bu)) + sum_{n in Neg(u)} [exp(s(f_au, f_an)) + exp(s(f_au, f_bn))]
    l(a, b, u)   = -log( exp(s(f_au, f_bu)) / den(a, b, u) )

the negatives being taken **from both maps of the pair**, as in the official code. The loss is
the mean of l over all ordered pairs and all anchors, so each pair is used in both directions.

``Neg(u)``, chosen by ``neg_index``:

- a (A, n_neg) table (``official_region_grid``: A = 13 anchors, regions 0..A-1, and the 5 fixed
  neighbouring regions of each): 2 * n_neg negatives per term, as the official code.
- ``None``: every region is an anchor and every *other* region of the two maps of the pair is
  a negative, 2 * (R - 1) per term. Negatives are not taken from the rest of the batch: the
  paper contrasts regions within the feature maps of the pair, and with L^D other images of
  the batch may be positives of the anchor.

Views that were cropped, scaled or flipped differently (``loss.views=transformed``,
docs/local-views.md) see region u at different places; the caller samples region u of each
view where that view shows it and passes ``valid`` (B, R), False for a region that falls
outside its view. Such a region is skipped: no term has it as anchor or positive, and it is
no negative. A term whose negatives are all skipped is skipped too (it would be 0 for free).
The loss is then the mean over the remaining terms, 0 if there are none.

Departures from the official code (docs/training.md, Stage 2): L^D uses the symmetric form, all 5
negatives, and a true mean, instead of one direction, 4 negatives and a 1.5x scale.

Chance level (all embeddings equal): every term is ``log(1 + 2 * n_neg)``, see
:func:`local_chance_level`; equal to the loss of ``torch.ones(B, R, D)``.

Shapes:
    embeddings: (B, R, D), any float dtype; normalised inside; fp32 log-sum-exp under autocast.
    image_ids, volume_ids, partition_ids: (B,) integers.
    neg_index: (A, n_neg) integer indices into the R regions, or None.
    valid: (B, R) bool, or None (every region of every map is valid).

Example:
    >>> grid = official_region_grid(48, 48, 3)
    >>> f = embedder(model.decode(*model.encode(x), blocks=3))  # (2N, 17, 128)
    >>> loss = local_contrastive_loss(f, torch.arange(N).repeat(2), neg_index=grid.neg_index)

References:
    Chaitanya, Erdil, Karani, Konukoglu. Contrastive learning of global and local features for
    medical image segmentation with limited annotations. NeurIPS 2020, arXiv 2006.10511.
    Chen, Kornblith, Norouzi, Hinton. SimCLR. ICML 2020, arXiv 2002.05709.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from contraseg.losses._pairs import IdLike, relation_masks

LOCAL_STRATEGIES = ("LR", "LD")


def local_pairs(
    image_ids: IdLike,
    volume_ids: IdLike | None = None,
    partition_ids: IdLike | None = None,
    strategy: str = "LR",
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """The ordered image pairs (a, b) as two (P,) long tensors.

    Raises ValueError for an unknown strategy, L^D without partition/volume ids, or an image
    without any positive image.
    """
    if strategy not in LOCAL_STRATEGIES:
        raise ValueError(f"unknown local strategy {strategy!r}; expected one of {LOCAL_STRATEGIES}")
    batch = len(image_ids)
    same_image, partner = relation_masks(
        image_ids,
        volume_ids,
        partition_ids,
        batch,
        torch.device(device),
        strategy == "LD",
        strategy,
    )
    positives = same_image | partner
    lonely = (~positives.any(dim=1)).nonzero().flatten()
    if lonely.numel():
        raise ValueError(
            f"images {lonely[:8].tolist()} have no positive under strategy {strategy!r} "
            f"(each image needs at least two views)"
        )
    first, second = positives.nonzero(as_tuple=True)
    return first, second


def check_neg_index(neg_index: Tensor, n_regions: int) -> Tensor:
    """``neg_index`` as int64 after checking it is an (A, n_neg) table of other regions."""
    if neg_index.ndim != 2 or neg_index.dtype.is_floating_point or neg_index.shape[1] < 1:
        raise ValueError(
            f"neg_index must be an integer (A, n_neg) tensor, got {tuple(neg_index.shape)}"
        )
    if neg_index.shape[0] > n_regions or neg_index.min() < 0 or neg_index.max() >= n_regions:
        raise ValueError(
            f"neg_index of shape {tuple(neg_index.shape)} refers to regions outside "
            f"0..{n_regions - 1}"
        )
    own = torch.arange(neg_index.shape[0], device=neg_index.device)[:, None]
    if (neg_index == own).any():
        raise ValueError("neg_index lists an anchor region among its own negatives")
    return neg_index.long()


def _check_valid(valid: Tensor, batch: int, n_regions: int, device: torch.device) -> Tensor:
    if valid.dtype != torch.bool or valid.shape != (batch, n_regions):
        raise ValueError(
            f"valid must be a bool ({batch}, {n_regions}) tensor, got {valid.dtype} "
            f"{tuple(valid.shape)}"
        )
    return valid.to(device)


def _valid_negatives(
    valid: Tensor, first: Tensor, second: Tensor, neg_index: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Which negatives of each term exist, from map a and from map b, and which terms count.

    Shapes: (P, A, n) for a ``neg_index`` table, (P, R, R) with a False diagonal for None;
    the terms (P, A): anchor and positive valid and at least one negative left.
    """
    valid_a, valid_b = valid.index_select(0, first), valid.index_select(0, second)
    if neg_index is None:
        n_regions = valid.shape[1]
        others = ~torch.eye(n_regions, dtype=torch.bool, device=valid.device)
        own_ok, cross_ok = valid_a[:, None, :] & others, valid_b[:, None, :] & others
    else:
        own_ok, cross_ok = valid_a[:, neg_index], valid_b[:, neg_index]
    anchors = own_ok.shape[1]
    counted = valid_a[:, :anchors] & valid_b[:, :anchors] & (own_ok | cross_ok).any(dim=2)
    return own_ok, cross_ok, counted


def local_contrastive_loss(
    embeddings: Tensor,
    image_ids: IdLike,
    volume_ids: IdLike | None = None,
    partition_ids: IdLike | None = None,
    strategy: str = "LR",
    neg_index: Tensor | None = None,
    temperature: float = 0.1,
    valid: Tensor | None = None,
) -> Tensor:
    """Mean over ordered image pairs and anchor regions of l(a, b, u) (module docstring),
    over the terms ``valid`` leaves when it is given.

    Returns a scalar in fp32 (fp64 if ``embeddings`` is fp64).
    """
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must be (B, R, D), got shape {tuple(embeddings.shape)}")
    batch, n_regions = embeddings.shape[0], embeddings.shape[1]
    if len(image_ids) != batch:
        raise ValueError(f"image_ids has {len(image_ids)} entries for {batch} feature maps")
    if neg_index is None and n_regions < 2:
        raise ValueError(f"negatives='all' needs at least 2 regions per map, got {n_regions}")
    first, second = local_pairs(image_ids, volume_ids, partition_ids, strategy, embeddings.device)
    if neg_index is not None:
        neg_index = check_neg_index(neg_index.to(embeddings.device), n_regions)
    if valid is not None:
        valid = _check_valid(valid, batch, n_regions, embeddings.device)
    return local_loss_from_pairs(embeddings, first, second, neg_index, temperature, valid)


def local_loss_from_pairs(
    embeddings: Tensor,
    first: Tensor,
    second: Tensor,
    neg_index: Tensor | None = None,
    temperature: float = 0.1,
    valid: Tensor | None = None,
) -> Tensor:
    """:func:`local_contrastive_loss` given the image pairs of :func:`local_pairs`, a
    ``neg_index`` already passed through :func:`check_neg_index` and a checked ``valid``, all on
    the embeddings' device.

    Finding the pairs and checking the table wait for the device; a training loop whose
    batches share one layout does both once and calls this, which waits for nothing and has
    shapes fixed by the batch (what ``torch.compile`` and CUDA graphs need).
    """
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must be (B, R, D), got shape {tuple(embeddings.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n_regions = embeddings.shape[1]
    if valid is not None:
        own_ok, cross_ok, counted = _valid_negatives(valid, first, second, neg_index)
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        unit = F.normalize(embeddings.to(dtype), dim=2)
        # index_select, not ``unit[first]``: the ids repeat, and the backward of advanced
        # indexing accumulates repeats in a thread-dependent order on the CPU (not bitwise
        # reproducible), while index_select's backward is.
        own = unit @ unit.transpose(1, 2) / temperature  # (B, R, R) within each map
        unit_a, unit_b = unit.index_select(0, first), unit.index_select(0, second)
        cross = unit_a @ unit_b.transpose(1, 2) / temperature  # (P, R, R): a vs b
        own = own.index_select(0, first)  # (P, R, R): a vs a
        if neg_index is None:
            # Row u of ``cross`` holds the positive (column u) and the negatives of map b;
            # row u of ``own`` the negatives of map a once the anchor itself is masked out.
            eye = torch.eye(n_regions, dtype=torch.bool, device=unit.device)
            positive = cross.diagonal(dim1=1, dim2=2)
            own = own.masked_fill(eye, -math.inf)
            if valid is not None:
                own = own.masked_fill(~own_ok, -math.inf)
                cross = cross.masked_fill(~(cross_ok | eye), -math.inf)
            logits = torch.cat([own, cross], dim=2)
        else:
            rows = torch.arange(neg_index.shape[0], device=unit.device)
            positive = cross[:, rows, rows]  # (P, A)
            own_neg, cross_neg = (
                own[:, rows[:, None], neg_index],
                cross[:, rows[:, None], neg_index],
            )
            if valid is not None:
                own_neg = own_neg.masked_fill(~own_ok, -math.inf)
                cross_neg = cross_neg.masked_fill(~cross_ok, -math.inf)
            logits = torch.cat([positive[..., None], own_neg, cross_neg], dim=2)
        # every row keeps its positive, so the log-sum-exp (and its gradient) stays finite
        terms = torch.logsumexp(logits, dim=2) - positive
        if valid is None:
            return terms.mean()
        return torch.where(counted, terms, 0.0).sum() / counted.sum().clamp(min=1)


def local_chance_level(n_regions: int, neg_index: Tensor | None = None) -> float:
    """The loss when all region embeddings are equal: ``log(1 + 2 * n_neg)``.

    ``n_neg`` is ``neg_index.shape[1]`` (official grid: log 11) or ``n_regions - 1`` when
    ``neg_index`` is None.
    """
    n_neg = n_regions - 1 if neg_index is None else neg_index.shape[1]
    return math.log1p(2 * n_neg)


def masked_local_chance_level(
    valid: Tensor,
    image_ids: IdLike,
    volume_ids: IdLike | None = None,
    partition_ids: IdLike | None = None,
    strategy: str = "LR",
    neg_index: Tensor | None = None,
) -> Tensor:
    """:func:`local_chance_level` when ``valid`` (B, R) skips regions: the mean over the terms
    the loss counts of ``log(1 + negatives left)``; 0 when none counts. A 0-dim fp32 tensor on
    ``valid``'s device, so that logging it does not wait for the device.
    """
    batch, n_regions = valid.shape
    first, second = local_pairs(image_ids, volume_ids, partition_ids, strategy, valid.device)
    if neg_index is not None:
        neg_index = check_neg_index(neg_index.to(valid.device), n_regions)
    valid = _check_valid(valid, batch, n_regions, valid.device)
    return masked_chance_from_pairs(valid, first, second, neg_index)


def masked_chance_from_pairs(
    valid: Tensor, first: Tensor, second: Tensor, neg_index: Tensor | None = None
) -> Tensor:
    """:func:`masked_local_chance_level` given the pairs and checked inputs, as
    :func:`local_loss_from_pairs` takes them (nothing waits for the device)."""
    own_ok, cross_ok, counted = _valid_negatives(valid, first, second, neg_index)
    levels = torch.log1p((own_ok.sum(dim=2) + cross_ok.sum(dim=2)).float())
    return torch.where(counted, levels, 0.0).sum() / counted.sum().clamp(min=1)
