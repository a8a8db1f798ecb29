"""Global contrastive loss with the strategies G^R, G^{D-} and G^D (Chaitanya et al. 2020).

For a batch of B embeddings ``z`` (several views of some images), with
``s(a, k) = cos(z_a, z_k) / tau``, a set of positives P(a) and of negatives N(a) per anchor a:

    l(a, p) = -log( exp(s(a,p)) / (exp(s(a,p)) + sum_{n in N(a)} exp(s(a,n))) )
    loss    = 1 / |{(a, p)}| * sum_{a} sum_{p in P(a)} l(a, p)

i.e. one term per **ordered** positive pair, so each pair counts in both directions, averaged
(the paper's equation 1 and Figure 1). The strategies differ only in P and N:

- ``"GR"`` (SimCLR, random slices): P(a) = the other views of a's image; N(a) = every row that
  is not a view of a's image.
- ``"GD-"``: as GR, but rows from the same partition of *other* volumes are left out of N(a)
  (they are similar, so they make poor negatives).
- ``"GD"``: rows from the same partition of other volumes are positives too; N(a) = every row
  that is neither a nor a positive.

The denominator holds the positive of the term and the negatives, never the anchor and never
the *other* positives of a. With two views per image (B = 2N rows) GR therefore equals the
SimCLR NT-Xent loss exactly (Chen et al., ICML 2020, eq. 1: mean over the 2N anchors of
``-log(exp(s(a,p)) / sum_{k != a} exp(s(a,k)))``), since then {k != a} = {p} + N(a). With more
than two views per image (the official G^{D-} uses original, aug1, aug2) the other views are
not in the denominator, as in the official code, whereas a multi-view NT-Xent would add them.

Chance level: when all embeddings are equal, every term is ``log(1 + |N(a)|)``;
:func:`global_chance_level` returns that mean, which is also the loss of ``torch.ones(B, D)``.

Shapes:
    z: (B, D), any float dtype; normalised inside, similarities and log-sum-exp in fp32 (fp64
    stays fp64) even inside ``torch.autocast``.
    image_ids, volume_ids, partition_ids: (B,) integers. Rows with the same image id are
    views of one image and must share volume and partition ids.

Example:
    >>> z = model_g1(model.encode(torch.cat([view1, view2]))[0])  # (2N, 128)
    >>> ids = torch.arange(N).repeat(2)
    >>> loss = global_contrastive_loss(z, ids, strategy="GR", temperature=0.1)

References:
    Chaitanya, Erdil, Karani, Konukoglu. Contrastive learning of global and local features for
    medical image segmentation with limited annotations. NeurIPS 2020, arXiv 2006.10511.
    Chen, Kornblith, Norouzi, Hinton. A simple framework for contrastive learning of visual
    representations (SimCLR). ICML 2020, arXiv 2002.05709.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from contraseg.losses._pairs import IdLike, relation_masks

GLOBAL_STRATEGIES = ("GR", "GD-", "GD")


def global_pair_masks(
    image_ids: IdLike,
    volume_ids: IdLike | None = None,
    partition_ids: IdLike | None = None,
    strategy: str = "GR",
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """(positives, negatives): (B, B) bool masks, row a holding P(a) and N(a).

    Raises ValueError for an unknown strategy, missing or malformed ids, or an anchor without
    a positive or without a negative: the batch layout is then certainly wrong (e.g. one view
    per image, or G^D with a single partition), and the loss would be silently empty or zero.
    """
    if strategy not in GLOBAL_STRATEGIES:
        raise ValueError(
            f"unknown global strategy {strategy!r}; expected one of {GLOBAL_STRATEGIES}"
        )
    batch = len(image_ids)
    device = torch.device(device)
    same_image, partner = relation_masks(
        image_ids, volume_ids, partition_ids, batch, device, strategy != "GR", strategy
    )
    eye = torch.eye(batch, dtype=torch.bool, device=device)
    positives = same_image | partner if strategy == "GD" else same_image
    negatives = ~(positives | partner | eye)
    lonely = (~positives.any(dim=1)).nonzero().flatten()
    if lonely.numel():
        raise ValueError(
            f"anchor rows {lonely[:8].tolist()} have no positive under strategy {strategy!r} "
            f"(each image needs at least two views)"
        )
    alone = (~negatives.any(dim=1)).nonzero().flatten()
    if alone.numel():
        raise ValueError(
            f"anchor rows {alone[:8].tolist()} have no negative under strategy {strategy!r}"
        )
    return positives, negatives


def global_contrastive_loss(
    z: Tensor,
    image_ids: IdLike,
    volume_ids: IdLike | None = None,
    partition_ids: IdLike | None = None,
    strategy: str = "GR",
    temperature: float = 0.1,
) -> Tensor:
    """Mean over ordered positive pairs of the InfoNCE term (see the module docstring).

    Returns a scalar in fp32 (fp64 if ``z`` is fp64).
    """
    if z.ndim != 2:
        raise ValueError(f"z must be (B, D), got shape {tuple(z.shape)}")
    if len(image_ids) != z.shape[0]:
        raise ValueError(f"image_ids has {len(image_ids)} entries for {z.shape[0]} rows of z")
    pairs = global_pairs(image_ids, volume_ids, partition_ids, strategy, z.device)
    return global_loss_from_pairs(z, pairs, temperature)


class GlobalPairs(NamedTuple):
    """What the loss needs of the ids: the (B, B) negatives mask and the ordered positive pairs
    as (P,) anchor and positive rows."""

    negatives: Tensor
    anchor: Tensor
    positive: Tensor


def global_pairs(
    image_ids: IdLike,
    volume_ids: IdLike | None = None,
    partition_ids: IdLike | None = None,
    strategy: str = "GR",
    device: torch.device | str = "cpu",
) -> GlobalPairs:
    """The pairs of :func:`global_pair_masks`, found once for a batch layout that repeats.

    Finding them checks the ids and waits for the device; a training loop whose batches share
    one layout finds them once and calls :func:`global_loss_from_pairs`, which does neither.
    """
    positives, negatives = global_pair_masks(image_ids, volume_ids, partition_ids, strategy, device)
    anchor, positive = positives.nonzero(as_tuple=True)
    return GlobalPairs(negatives, anchor, positive)


def global_loss_from_pairs(z: Tensor, pairs: GlobalPairs, temperature: float = 0.1) -> Tensor:
    """:func:`global_contrastive_loss` of ``z`` (B, D) given its :func:`global_pairs`; nothing
    here waits for the device, and every shape is fixed by B (what ``torch.compile`` and CUDA
    graphs need)."""
    if z.ndim != 2 or pairs.negatives.shape != (z.shape[0], z.shape[0]):
        raise ValueError(
            f"z must be (B, D) with B = {pairs.negatives.shape[0]}, got {tuple(z.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    dtype = torch.promote_types(z.dtype, torch.float32)
    with torch.autocast(device_type=z.device.type, enabled=False):
        unit = F.normalize(z.to(dtype), dim=1)
        sim = unit @ unit.T / temperature
        # log sum_{n in N(a)} exp(s(a, n)), one value per anchor, shared by its pairs.
        neg_lse = torch.logsumexp(sim.masked_fill(~pairs.negatives, -math.inf), dim=1)
        s_ap = sim[pairs.anchor, pairs.positive]
        # index_select: anchors repeat, and its backward is reproducible on the CPU
        return (torch.logaddexp(s_ap, neg_lse.index_select(0, pairs.anchor)) - s_ap).mean()


def global_chance_level(
    image_ids: IdLike,
    volume_ids: IdLike | None = None,
    partition_ids: IdLike | None = None,
    strategy: str = "GR",
) -> float:
    """The loss when all similarities are equal: mean over pairs (a, p) of log(1 + |N(a)|).

    A trained encoder should get well below it; equal to ``global_contrastive_loss`` of
    ``torch.ones(B, D)`` with the same ids.
    """
    positives, negatives = global_pair_masks(image_ids, volume_ids, partition_ids, strategy)
    anchor = positives.nonzero(as_tuple=True)[0]
    n_neg = negatives.sum(dim=1).double()[anchor]
    return float(torch.log1p(n_neg).mean())
