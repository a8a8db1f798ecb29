"""Local contrastive loss with the strategies L^R and L^D (Chaitanya et al. 2020, method_spec 4).

Input: region embeddings ``f`` of shape (B, R, D), row b being R regions of the feature map
g2(d_l(e(x_b))) taken at the same corners in every image (``LocalEmbedder``). Two images a, b
form an ordered **pair** when b is a positive image of a:

- ``"LR"``: b is another view of a's image (same image id; the views differ by intensity
  augmentation only, so region u of one matches region u of the other).
- ``"LD"``: also any view of the same partition in another volume.

For a pair (a, b) and an anchor region u, with ``s(x, y) = cos(x, y) / tau``:

    den(a, b, u) = exp(s(f_au, f_bu)) + sum_{n in Neg(u)} [exp(s(f_au, f_an)) + exp(s(f_au, f_bn))]
    l(a, b, u)   = -log( exp(s(f_au, f_bu)) / den(a, b, u) )

the negatives being taken **from both maps of the pair** (method_spec 4.2). The loss is the mean
of l over all ordered pairs and all anchors, so each pair is used in both directions.

``Neg(u)``, chosen by ``neg_index``:

- a (A, n_neg) table (``official_region_grid``: A = 13 anchors, regions 0..A-1, and the 5 fixed
  neighbouring regions of each): 2 * n_neg negatives per term, as the official code.
- ``None``: every region is an anchor and every *other* region of the two maps of the pair is
  a negative, 2 * (R - 1) per term. Negatives are not taken from the rest of the batch: the
  paper contrasts regions within the feature maps of the pair, and with L^D other images of
  the batch may be positives of the anchor.

Departures from the official code (method_spec 4.3, 9.9): L^D uses the symmetric form, all 5
negatives, and a true mean, instead of one direction, 4 negatives and a 1.5x scale.

Chance level (all embeddings equal): every term is ``log(1 + 2 * n_neg)``, see
:func:`local_chance_level`; equal to the loss of ``torch.ones(B, R, D)``.

Shapes:
    embeddings: (B, R, D), any float dtype; normalised inside; fp32 log-sum-exp under autocast.
    image_ids, volume_ids, partition_ids: (B,) integers.
    neg_index: (A, n_neg) integer indices into the R regions, or None.

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


def local_contrastive_loss(
    embeddings: Tensor,
    image_ids: IdLike,
    volume_ids: IdLike | None = None,
    partition_ids: IdLike | None = None,
    strategy: str = "LR",
    neg_index: Tensor | None = None,
    temperature: float = 0.1,
) -> Tensor:
    """Mean over ordered image pairs and anchor regions of l(a, b, u) (module docstring).

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
    return local_loss_from_pairs(embeddings, first, second, neg_index, temperature)


def local_loss_from_pairs(
    embeddings: Tensor,
    first: Tensor,
    second: Tensor,
    neg_index: Tensor | None = None,
    temperature: float = 0.1,
) -> Tensor:
    """:func:`local_contrastive_loss` given the image pairs of :func:`local_pairs` and a
    ``neg_index`` already passed through :func:`check_neg_index`, on the embeddings' device.

    Finding the pairs and checking the table wait for the device; a training loop whose
    batches share one layout does both once and calls this, which waits for nothing and has
    shapes fixed by the batch (what ``torch.compile`` and CUDA graphs need).
    """
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must be (B, R, D), got shape {tuple(embeddings.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n_regions = embeddings.shape[1]
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
            logits = torch.cat([own.masked_fill(eye, -math.inf), cross], dim=2)
        else:
            rows = torch.arange(neg_index.shape[0], device=unit.device)
            positive = cross[:, rows, rows]  # (P, A)
            logits = torch.cat(
                [
                    positive[..., None],
                    own[:, rows[:, None], neg_index],
                    cross[:, rows[:, None], neg_index],
                ],
                dim=2,
            )
        return (torch.logsumexp(logits, dim=2) - positive).mean()


def local_chance_level(n_regions: int, neg_index: Tensor | None = None) -> float:
    """The loss when all region embeddings are equal: ``log(1 + 2 * n_neg)``.

    ``n_neg`` is ``neg_index.shape[1]`` (official grid: log 11) or ``n_regions - 1`` when
    ``neg_index`` is None.
    """
    n_neg = n_regions - 1 if neg_index is None else neg_index.shape[1]
    return math.log1p(2 * n_neg)
