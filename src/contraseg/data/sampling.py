"""Slice sampling for pre-training and fine-tuning (docs/data.md), on the device.

Partition rule, as in the official code: a volume of n slices is split into S partitions with
boundaries ``k * floor(n / S)``, k = 0..S. The trailing ``n mod S`` slices (at the end of the
stack, the apex for ACDC-like data) belong to no partition and are never drawn by the partition
sampler; :class:`RandomSliceSampler` draws every slice and counts trailing slices as part of the
last partition. Unlike the official code, a partition batch never holds empty (all-zero) slots:
it is exactly m distinct volumes x S partitions.

Where the data lives: a :class:`SlicePool` holds every slice of the sampled volumes in one
tensor on the training device (ACDC's pre-training pool is about 150 MB at 192 x 192), so that
a batch is one gather by index there. A pool larger than its memory budget stays in the
memory-mapped cache files and each batch is gathered on the host into pinned memory and copied
asynchronously; the next batch's slices are gathered in a background thread while the current
one trains (its indices drawn ahead from a copy of the generator, so the generator itself, and
what a checkpoint saves of it, is never ahead of the batches handed out).

Randomness: the indices are drawn on the CPU from the caller's ``torch.Generator`` (the run's
sampling generator, saved in every checkpoint), so that a seed draws the same slices on any
device and a resumed run draws what the uninterrupted one would. They reach the device in one
small asynchronous copy per batch; nothing waits for the device.

Several ranks (``rank``, ``world_size``): every rank makes the same draw for the whole batch of
``world_size`` ranks and keeps its own block, so that the ranks' batches concatenated in rank
order are the batch one process would draw with ``world_size`` times the per-rank size, and
the partition sampler gives each rank distinct volumes (:func:`rank_volumes`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from contraseg.devices import to_device
from contraseg.errors import InputError

# Share of the device's free memory (of the host's memory on the CPU) a pool may take before it
# is left in the cache files; the rest is for the network's activations.
POOL_BUDGET_FRACTION = 0.25

ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)
_T = TypeVar("_T")
Draw = tuple[Tensor, Tensor, Tensor]  # volume, partition and slice ids of a batch (CPU int64)


class _Gatherer:
    """The one thread of a process that gathers host pools' next batches (SlicePool.prefetch),
    started at the first one. A forked child starts its own: the parent's thread is not
    copied into it, and waiting on an executor whose thread is gone would never end."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        os.register_at_fork(after_in_child=self._forget)

    def submit(self, fn: Callable[..., _T], *args: Any) -> Future[_T]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="contraseg-gather")
        return self._executor.submit(fn, *args)

    def _forget(self) -> None:
        self._executor = None


_GATHERER = _Gatherer()


def partition_bounds(n_slices: int, partitions: int) -> np.ndarray:
    """Boundaries ``k * floor(n_slices / partitions)`` for k = 0..partitions (S + 1 ints)."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    if n_slices < partitions:
        raise InputError(None, f"{n_slices} slices are fewer than {partitions} partitions")
    return np.arange(partitions + 1, dtype=np.int64) * (n_slices // partitions)


@dataclass
class SliceBatch:
    """A batch of 2-D slices with where each came from, on the pool's device."""

    images: Tensor  # (B, C, H, W) float32
    volume_ids: Tensor  # (B,) int64: index into the pool's volumes
    partition_ids: Tensor  # (B,) int64
    slice_ids: Tensor  # (B,) int64: slice index within its volume
    labels: Tensor | None = None  # (B, H, W) int64


def default_budget(device: torch.device) -> int:
    """Bytes a pool may take on ``device``: a share of its free memory (of the host's RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(free * POOL_BUDGET_FRACTION)


class SlicePool:
    """Every slice of ``volumes`` (each (Z, C, H, W)) and of their ``labels`` (each (Z, H, W)),
    flattened in volume order, ready to be gathered by index on ``device``.

    ``resident`` tells whether the slices were copied to the device (when they fit
    ``budget`` bytes, by default :func:`default_budget`) or are gathered on the host per batch,
    the next one in the background (:meth:`prefetch`).
    """

    def __init__(
        self,
        volumes: Sequence[np.ndarray],
        labels: Sequence[np.ndarray] | None = None,
        device: torch.device | str = "cpu",
        budget: int | None = None,
    ) -> None:
        if len(volumes) == 0:
            raise ValueError("no volumes to sample from")
        shapes = {tuple(v.shape[1:]) for v in volumes}
        if len(shapes) != 1 or any(v.ndim != 4 for v in volumes):
            raise ValueError(
                f"volumes must be (Z, C, H, W) with one (C, H, W); got {sorted(shapes)}"
            )
        if labels is not None and (
            len(labels) != len(volumes)
            or any(
                lab.shape != (v.shape[0], *v.shape[2:])
                for lab, v in zip(labels, volumes, strict=True)
            )
        ):
            raise ValueError("labels must match volumes: one (Z, H, W) per (Z, C, H, W)")
        self.device = torch.device(device)
        self.volumes = volumes
        self.labels = labels
        self.sizes = torch.tensor([v.shape[0] for v in volumes])
        self.starts = torch.cumsum(self.sizes, 0) - self.sizes  # flat index of each slice 0
        self.slice_shape = tuple(volumes[0].shape[1:])
        per_slice = 4 * int(np.prod(self.slice_shape))
        if labels is not None:
            per_slice += int(np.prod(self.slice_shape[1:]))
        limit = default_budget(self.device) if budget is None else budget
        self.resident = per_slice * len(self) <= limit
        self._images: Tensor | None = None
        self._labels: Tensor | None = None
        self._ahead: tuple[Tensor, Future[tuple[Tensor, Tensor | None]]] | None = None
        if self.resident:
            stack = np.concatenate([np.asarray(v, np.float32) for v in volumes])
            self._images = torch.from_numpy(stack).to(self.device)
            if labels is not None:
                stack = np.concatenate([np.asarray(lab, np.uint8) for lab in labels])
                self._labels = torch.from_numpy(stack).to(self.device)

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def batch(self, vol: Tensor, part: Tensor, sl: Tensor) -> SliceBatch:
        """The :class:`SliceBatch` of slices ``sl`` of volumes ``vol`` (CPU int64 tensors)."""
        flat = self.starts[vol] + sl
        ids = to_device(torch.stack([flat, vol, part, sl]), self.device)
        if self._images is not None:
            images = self._images.index_select(0, ids[0])
            labels = None if self._labels is None else self._labels.index_select(0, ids[0])
        else:
            images, labels = self._from_host(flat, vol, sl)
        return SliceBatch(images, ids[1], ids[2], ids[3], None if labels is None else labels.long())

    def prefetch(self, vol: Tensor, part: Tensor, sl: Tensor) -> None:
        """Start gathering, in a background thread, the slices that the next :meth:`batch` will
        ask for (nothing for a resident pool). A :meth:`batch` for other slices gathers its
        own and drops these."""
        if self.resident:
            return
        flat = self.starts[vol] + sl
        self._ahead = (flat, _GATHERER.submit(self._gather_on_host, vol, sl))

    def _from_host(self, flat: Tensor, vol: Tensor, sl: Tensor) -> tuple[Tensor, Tensor | None]:
        """The slices on the device, copied without waiting for it from the host memory they
        were gathered into (by :meth:`prefetch` when it guessed these slices)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and torch.equal(ahead[0], flat):
            images, labels = ahead[1].result()
        else:
            images, labels = self._gather_on_host(vol, sl)
        pinned = self.device.type == "cuda"
        images = images.to(self.device, non_blocking=pinned)
        return images, None if labels is None else labels.to(self.device, non_blocking=pinned)

    def _gather_on_host(self, vol: Tensor, sl: Tensor) -> tuple[Tensor, Tensor | None]:
        """Slices read from the cache files into (pinned, for a GPU) host memory."""
        pin = self.device.type == "cuda"
        images = torch.empty((len(vol), *self.slice_shape), pin_memory=pin)
        labels = None
        if self.labels is not None:
            shape = (len(vol), *self.slice_shape[1:])
            labels = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
        image_rows = images.numpy()  # views: the memory maps are copied straight in
        label_rows = None if labels is None else labels.numpy()
        for i, (v, z) in enumerate(zip(vol.tolist(), sl.tolist(), strict=True)):
            image_rows[i] = self.volumes[v][z]
            if label_rows is not None and self.labels is not None:
                label_rows[i] = self.labels[v][z]
        return images, labels


def _sample(
    pool: SlicePool, draw: Callable[[torch.Generator], Draw], generator: torch.Generator
) -> SliceBatch:
    """The batch of ``draw`` from ``generator``; for a pool on the host, also the prefetch of
    the next batch, drawn from a copy of the generator so that ``generator`` stays where the
    batches handed out leave it (a checkpoint saves it; a resumed run draws on from there)."""
    batch = pool.batch(*draw(generator))
    if not pool.resident:
        ahead = torch.Generator()
        ahead.set_state(generator.get_state())
        pool.prefetch(*draw(ahead))
    return batch


def _check_share(batch: int, rank: int, world_size: int) -> None:
    if batch < 1:
        raise ValueError(f"the batch must hold at least one image, got {batch}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")


class PartitionSampler:
    """m distinct volumes x S partitions, one uniformly random slice per partition (G^D, L^D).

    Order: vol0:p0..p(S-1), vol1:p0..p(S-1), ...; the batch holds m * S images. With several
    ranks, m is per rank and the ranks hold ``world_size * m`` distinct volumes together.
    """

    def __init__(
        self,
        pool: SlicePool,
        partitions: int,
        volumes_per_batch: int,
        generator: torch.Generator,
        names: Sequence[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_share(volumes_per_batch, rank, world_size)
        n_volumes = len(pool.volumes)
        if world_size * volumes_per_batch > n_volumes:
            ranks = f" x {world_size} ranks" if world_size > 1 else ""
            raise ValueError(
                f"{volumes_per_batch} volumes per batch{ranks} need that many distinct volumes, "
                f"but the pool has {n_volumes}"
            )
        bounds = []
        for i, size in enumerate(pool.sizes.tolist()):
            try:
                bounds.append(partition_bounds(size, partitions))
            except InputError as err:
                raise InputError(names[i] if names else f"volume {i}", err.problem) from None
        self.pool = pool
        self.partitions = partitions
        self.volumes_per_batch = volumes_per_batch
        self.generator = generator
        self.rank, self.world_size = rank, world_size
        lo_hi = torch.from_numpy(np.stack(bounds))
        self._lo, self._width = lo_hi[:, :-1], lo_hi[:, 1:] - lo_hi[:, :-1]  # (V, S)

    def layout(self) -> tuple[Tensor, Tensor]:
        """(volume ids, partition ids) of a batch of this rank as the losses see them: which
        rows share a volume and which a partition is the same in every batch drawn."""
        m, s = self.volumes_per_batch, self.partitions
        volumes = torch.arange(self.rank * m, (self.rank + 1) * m)
        return volumes.repeat_interleave(s), torch.arange(s).repeat(m)

    def sample(self) -> SliceBatch:
        return _sample(self.pool, self._draw, self.generator)

    def _draw(self, g: torch.Generator) -> Draw:
        m, s = self.volumes_per_batch, self.partitions
        draw = torch.randperm(len(self.pool.volumes), generator=g)[: self.world_size * m]
        # one uniform per slot of the whole batch, so every rank's stream stays the same
        u = torch.rand(self.world_size * m * s, generator=g, dtype=torch.float64)
        vol = rank_volumes(draw, self.rank, self.world_size).repeat_interleave(s)
        part = torch.arange(s).repeat(m)
        u = u[self.rank * m * s : (self.rank + 1) * m * s]
        sl = self._lo[vol, part] + (u * self._width[vol, part]).long()
        return vol, part, sl


class RandomSliceSampler:
    """``batch_size`` slices drawn uniformly with replacement from all slices (G^R, L^R, FT).

    With several ranks, ``batch_size`` is per rank: the ranks share one draw of
    ``world_size * batch_size`` slices.
    """

    def __init__(
        self,
        pool: SlicePool,
        batch_size: int,
        generator: torch.Generator,
        partitions: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_share(batch_size, rank, world_size)
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        self.pool = pool
        self.batch_size = batch_size
        self.partitions = partitions
        self.generator = generator
        self.rank, self.world_size = rank, world_size
        sizes = pool.sizes
        self._vol = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        self._slice = torch.arange(len(pool)) - pool.starts[self._vol]
        width = torch.clamp(sizes // partitions, min=1)[self._vol]
        self._part = torch.clamp(self._slice // width, max=partitions - 1)

    def sample(self) -> SliceBatch:
        return _sample(self.pool, self._draw, self.generator)

    def _draw(self, generator: torch.Generator) -> Draw:
        b = self.batch_size
        idx = torch.randint(len(self.pool), (self.world_size * b,), generator=generator)
        idx = idx[self.rank * b : (self.rank + 1) * b]
        return self._vol[idx], self._part[idx], self._slice[idx]


def rank_volumes(draw: ArrayT, rank: int, world_size: int) -> ArrayT:
    """Rank ``rank``'s m volumes out of one draw of ``world_size * m`` distinct volumes.

    Every rank makes the same seeded draw (one generator state shared by the ranks) and keeps
    the contiguous block ``draw[rank * m:(rank + 1) * m]``: the ranks then hold distinct volumes,
    so that G^D and L^D pair the same partition across ranks, and their batches concatenated in
    rank order are the single-process batch of ``world_size * m`` volumes. (A numpy array or a
    CPU tensor.)
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    if draw.ndim != 1 or len(draw) % world_size:
        raise ValueError(
            f"the draw must be 1-D with a multiple of {world_size} volumes, got {draw.shape}"
        )
    if len(np.unique(np.asarray(draw))) != len(draw):
        raise ValueError("the draw repeats a volume, so two ranks could share it")
    m = len(draw) // world_size
    return draw[rank * m : (rank + 1) * m]
