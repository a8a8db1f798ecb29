"""Slice sampling for pre-training and fine-tuning (method_spec section 3.2).

Partition rule, as in the official code: a volume of n slices is split into S partitions with
boundaries ``k * floor(n / S)``, k = 0..S. The trailing ``n mod S`` slices (at the end of the
stack, the apex for ACDC-like data) belong to no partition and are never drawn by the partition
sampler; :class:`RandomSliceSampler` draws every slice and counts trailing slices as part of the
last partition. Unlike the official code, a partition batch never holds empty (all-zero) slots:
it is exactly m distinct volumes x S partitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from contraseg.errors import InputError


def partition_bounds(n_slices: int, partitions: int) -> np.ndarray:
    """Boundaries ``k * floor(n_slices / partitions)`` for k = 0..partitions (S + 1 ints)."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    if n_slices < partitions:
        raise InputError(None, f"{n_slices} slices are fewer than {partitions} partitions")
    return np.arange(partitions + 1, dtype=np.int64) * (n_slices // partitions)


@dataclass
class SliceBatch:
    """A batch of 2-D slices with where each came from."""

    images: torch.Tensor  # (B, C, H, W) float32
    volume_ids: torch.Tensor  # (B,) int64: index into the sampler's ``volumes``
    partition_ids: torch.Tensor  # (B,) int64
    slice_ids: torch.Tensor  # (B,) int64: slice index within its volume
    labels: torch.Tensor | None = None  # (B, H, W) int64


def _check_volumes(volumes: Sequence[np.ndarray]) -> None:
    if len(volumes) == 0:
        raise ValueError("no volumes to sample from")
    shapes = {tuple(v.shape[1:]) for v in volumes}
    if len(shapes) != 1 or any(v.ndim != 4 for v in volumes):
        raise ValueError(f"volumes must be (Z, C, H, W) with one (C, H, W); got {sorted(shapes)}")


def _gather(volumes: Sequence[np.ndarray], vol: np.ndarray, sl: np.ndarray) -> torch.Tensor:
    stack = np.stack([np.asarray(volumes[v][z], np.float32) for v, z in zip(vol, sl, strict=True)])
    return torch.from_numpy(stack)


class PartitionSampler:
    """m distinct volumes x S partitions, one uniformly random slice per partition (G^D, L^D).

    Order: vol0:p0..p(S-1), vol1:p0..p(S-1), ...; the batch holds m * S images.
    """

    def __init__(
        self,
        volumes: Sequence[np.ndarray],
        partitions: int,
        volumes_per_batch: int,
        rng: np.random.Generator,
        names: Sequence[str] | None = None,
    ) -> None:
        _check_volumes(volumes)
        if not 1 <= volumes_per_batch <= len(volumes):
            raise ValueError(
                f"volumes_per_batch must be in 1..{len(volumes)} (the number of volumes), "
                f"got {volumes_per_batch}"
            )
        bounds = []
        for i, v in enumerate(volumes):
            try:
                bounds.append(partition_bounds(v.shape[0], partitions))
            except InputError as err:
                raise InputError(names[i] if names else f"volume {i}", err.problem) from None
        self.volumes = volumes
        self.partitions = partitions
        self.volumes_per_batch = volumes_per_batch
        self.rng = rng
        self._lo = np.stack([b[:-1] for b in bounds])  # (V, S)
        self._hi = np.stack([b[1:] for b in bounds])

    def sample(self) -> SliceBatch:
        m, s = self.volumes_per_batch, self.partitions
        vol = np.repeat(self.rng.choice(len(self.volumes), size=m, replace=False), s)
        part = np.tile(np.arange(s), m)
        sl = self.rng.integers(self._lo[vol, part], self._hi[vol, part])
        return SliceBatch(
            images=_gather(self.volumes, vol, sl),
            volume_ids=torch.from_numpy(vol.astype(np.int64)),
            partition_ids=torch.from_numpy(part.astype(np.int64)),
            slice_ids=torch.from_numpy(sl.astype(np.int64)),
        )


class RandomSliceSampler:
    """``batch_size`` slices drawn uniformly with replacement from all slices (G^R, L^R, FT)."""

    def __init__(
        self,
        volumes: Sequence[np.ndarray],
        batch_size: int,
        rng: np.random.Generator,
        labels: Sequence[np.ndarray] | None = None,
        partitions: int = 1,
    ) -> None:
        _check_volumes(volumes)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        if labels is not None and (
            len(labels) != len(volumes)
            or any(
                lab.shape != (v.shape[0], *v.shape[2:])
                for lab, v in zip(labels, volumes, strict=True)
            )
        ):
            raise ValueError("labels must match volumes: one (Z, H, W) per (Z, C, H, W)")
        self.volumes = volumes
        self.labels = labels
        self.batch_size = batch_size
        self.partitions = partitions
        self.rng = rng
        sizes = np.array([v.shape[0] for v in volumes])
        self._vol = np.repeat(np.arange(len(volumes)), sizes)
        self._slice = np.concatenate([np.arange(n) for n in sizes])
        width = np.maximum(sizes // partitions, 1)[self._vol]
        self._part = np.minimum(self._slice // width, partitions - 1)

    def sample(self) -> SliceBatch:
        idx = self.rng.integers(0, len(self._vol), size=self.batch_size)
        vol, sl = self._vol[idx], self._slice[idx]
        labels = None
        if self.labels is not None:
            lab = np.stack([np.asarray(self.labels[v][z]) for v, z in zip(vol, sl, strict=True)])
            labels = torch.from_numpy(lab.astype(np.int64))
        return SliceBatch(
            images=_gather(self.volumes, vol, sl),
            volume_ids=torch.from_numpy(vol.astype(np.int64)),
            partition_ids=torch.from_numpy(self._part[idx].astype(np.int64)),
            slice_ids=torch.from_numpy(sl.astype(np.int64)),
            labels=labels,
        )


def rank_volumes(draw: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s m volumes out of one draw of ``world_size * m`` distinct volumes.

    Every rank makes the same seeded draw (one generator state shared by the ranks) and keeps
    the contiguous block ``draw[rank * m:(rank + 1) * m]``: the ranks then hold distinct volumes,
    so that G^D and L^D pair the same partition across ranks, and their batches concatenated in
    rank order are the single-process batch of ``world_size * m`` volumes.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    if draw.ndim != 1 or len(draw) % world_size:
        raise ValueError(
            f"the draw must be 1-D with a multiple of {world_size} volumes, got {draw.shape}"
        )
    if len(np.unique(draw)) != len(draw):
        raise ValueError("the draw repeats a volume, so two ranks could share it")
    m = len(draw) // world_size
    return draw[rank * m : (rank + 1) * m]
