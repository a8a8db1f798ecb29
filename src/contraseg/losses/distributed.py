"""Gather a contrastive batch across data-parallel ranks, so that N ranks of B images train as
one process of N x B images.

Every rank gathers the embeddings (with their gradient) and the ids of all ranks, and computes
the **full** loss on the gathered batch with the unchanged pure loss functions::

    z, ids = gather_contrastive_batch(z, image_ids, volume_ids, partition_ids)
    loss = global_contrastive_loss(z, *ids, strategy="GD", temperature=0.1)

so every rank holds the same loss value (rank 0 can log it as is) and every anchor sees the
negatives and positives of all ranks (G^D and L^D pair the same partition of volumes that live
on different ranks). The losses depend on the ids only, not on row positions, so the gathered
order ``[rank 0 rows | rank 1 rows | ...]`` needs no reordering.

Gradient. Rank r holds its slice Z_r of the gathered Z and computes L_r(Z) (here L_r = L for
every r). The backward of :func:`all_gather_with_grad` sums the incoming gradients over ranks
and returns rank r's slice, ``g_r = sum_r' dL_r'/dZ_r = N dL/dZ_r``. DDP then averages the
parameter gradients: ``1/N sum_r (dZ_r/dtheta)^T g_r = sum_r (dZ_r/dtheta)^T dL/dZ_r = dL/dtheta``,
the gradient of one process on the whole batch. (In general DDP thus trains the mean over ranks
of the per-rank losses, cross-rank paths included.) Z_r must reach the loss only through the
gather, or its direct path would be counted twice.

Id contract: ``image_ids`` are local to a rank (any integers, equal for views of one image);
they are made globally distinct here. ``volume_ids`` must already be global, i.e. index the same
volume list on every rank (the partition sampler's), and ranks must hold distinct volumes
(``contraseg.data.sampling.rank_volumes``); ``partition_ids`` are global by nature. Every rank
must pass tensors of the same shape (a fixed per-rank batch): ``all_gather`` needs it.

Without a process group, or with one rank, everything here is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from contraseg.losses._pairs import IdLike, as_ids


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(tensor: Tensor, world_size: int) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        ctx.rank, world_size = rank_and_world_size()
        ctx.rows = tensor.shape[0]
        return _all_gather(tensor, world_size)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # A copy: all_reduce works in place and autograd may still hold ``grad``.
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.narrow(0, ctx.rank * ctx.rows, ctx.rows)


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """The rows of every rank's ``tensor``, concatenated in rank order; differentiable.

    The backward gives each rank the gradient of the sum over ranks of their losses with
    respect to its own rows (module docstring). Identity without a process group.
    """
    if rank_and_world_size()[1] == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_gather_rows(tensor: Tensor) -> Tensor:
    """The rows of every rank's ``tensor`` in rank order, without gradient (masks, ids).
    Identity without a process group."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return tensor
    if tensor.dtype == torch.bool:  # gathered as bytes, which every backend carries
        return _all_gather(tensor.to(torch.uint8), world_size).bool()
    return _all_gather(tensor, world_size)


def gather_ids(
    image_ids: IdLike,
    volume_ids: IdLike | None = None,
    partition_ids: IdLike | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The ids of every rank in rank order, as (N * B,) long tensors on ``device``.

    Image ids are renumbered ``0..k-1`` per rank and offset by ``rank * B``, so that views of
    one image stay equal and images of different ranks never are; volume and partition ids are
    gathered as they are (see the module docstring for the contract). ``None`` stays ``None``.
    """
    device = torch.device(device)
    batch = len(image_ids)
    images = as_ids(image_ids, batch, "image_ids", device)
    volumes = None if volume_ids is None else as_ids(volume_ids, batch, "volume_ids", device)
    partitions = (
        None if partition_ids is None else as_ids(partition_ids, batch, "partition_ids", device)
    )
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return images, volumes, partitions
    local = torch.unique(images, return_inverse=True)[1]
    return (
        _all_gather(local + rank * batch, world_size),
        None if volumes is None else _all_gather(volumes, world_size),
        None if partitions is None else _all_gather(partitions, world_size),
    )


def gather_contrastive_batch(
    embeddings: Tensor,
    image_ids: IdLike,
    volume_ids: IdLike | None = None,
    partition_ids: IdLike | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor | None, Tensor | None]]:
    """(gathered embeddings, gathered (image, volume, partition) ids) for either loss.

    ``embeddings`` is (B, D) for the global loss or (B, R, D) for the local one; the gathered
    ids also serve ``global_chance_level``. Identity (ids as tensors) without a process group.
    """
    if len(image_ids) != embeddings.shape[0]:
        raise ValueError(
            f"image_ids has {len(image_ids)} entries for {embeddings.shape[0]} embeddings"
        )
    ids = gather_ids(image_ids, volume_ids, partition_ids, embeddings.device)
    return all_gather_with_grad(embeddings), ids
