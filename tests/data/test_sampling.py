"""Partition and random slice samplers: counts, ids, partition membership, no empty slots."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contraseg.data.sampling import (
    PartitionSampler,
    RandomSliceSampler,
    partition_bounds,
    rank_volumes,
)
from contraseg.errors import InputError


def _volumes(slice_counts: list[int], size: int = 4) -> list[np.ndarray]:
    """Volume i, slice z holds the value 1000 * (i + 1) + z + 1 everywhere: never zero."""
    return [
        np.broadcast_to(
            (1000.0 * (i + 1) + np.arange(n) + 1)[:, None, None, None], (n, 1, size, size)
        ).astype(np.float32)
        for i, n in enumerate(slice_counts)
    ]


def test_partition_bounds_official_rule() -> None:
    np.testing.assert_array_equal(partition_bounds(11, 4), [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(partition_bounds(8, 4), [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(partition_bounds(3, 1), [0, 3])
    with pytest.raises(InputError, match="fewer than 4 partitions"):
        partition_bounds(3, 4)
    with pytest.raises(ValueError):
        partition_bounds(3, 0)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    partitions=st.integers(1, 6),
    n_volumes=st.integers(1, 7),
)
def test_partition_sampler_invariants(data: st.DataObject, partitions: int, n_volumes: int) -> None:
    counts = data.draw(
        st.lists(st.integers(partitions, 20), min_size=n_volumes, max_size=n_volumes)
    )
    m = data.draw(st.integers(1, n_volumes))
    volumes = _volumes(counts)
    sampler = PartitionSampler(
        volumes, partitions, m, np.random.default_rng(data.draw(st.integers(0, 99)))
    )
    for _ in range(3):
        batch = sampler.sample()
        assert batch.images.shape == (m * partitions, 1, 4, 4)
        vol = batch.volume_ids.numpy()
        part = batch.partition_ids.numpy()
        sl = batch.slice_ids.numpy()
        assert len(set(vol.tolist())) == m  # m distinct volumes
        np.testing.assert_array_equal(vol, np.repeat(vol[::partitions], partitions))
        np.testing.assert_array_equal(part, np.tile(np.arange(partitions), m))
        for v, p, z, image in zip(vol, part, sl, batch.images.numpy(), strict=True):
            lo, hi = partition_bounds(counts[v], partitions)[p : p + 2]
            assert lo <= z < hi  # the slice lies in its partition
            assert np.all(image == 1000 * (v + 1) + z + 1)  # the right slice, never a zero slot
        assert batch.labels is None


def test_partition_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="volumes_per_batch"):
        PartitionSampler(_volumes([8, 8]), 4, 3, np.random.default_rng(0))
    with pytest.raises(InputError, match="fewer than 4") as info:
        PartitionSampler(_volumes([8, 3]), 4, 1, np.random.default_rng(0), names=["a", "b"])
    assert info.value.path == "b"


def test_partition_sampler_covers_every_partition_slice() -> None:
    sampler = PartitionSampler(_volumes([9, 10]), 3, 2, np.random.default_rng(0))
    seen = set()
    for _ in range(200):
        batch = sampler.sample()
        seen |= set(zip(batch.volume_ids.tolist(), batch.slice_ids.tolist(), strict=True))
    assert seen == {(v, z) for v, n in enumerate([9, 10]) for z in range(3 * (n // 3))}


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    batch_size=st.integers(1, 30),
    partitions=st.integers(1, 4),
    seed=st.integers(0, 99),
)
def test_random_slice_sampler_invariants(
    counts: list[int], batch_size: int, partitions: int, seed: int
) -> None:
    volumes = _volumes(counts)
    labels = [(v[:, 0] % 4).astype(np.uint8) for v in volumes]
    batch = RandomSliceSampler(
        volumes, batch_size, np.random.default_rng(seed), labels=labels, partitions=partitions
    ).sample()
    assert batch.images.shape == (batch_size, 1, 4, 4)
    assert batch.labels is not None and batch.labels.shape == (batch_size, 4, 4)
    for v, p, z, image, label in zip(
        batch.volume_ids.tolist(),
        batch.partition_ids.tolist(),
        batch.slice_ids.tolist(),
        batch.images.numpy(),
        batch.labels.numpy(),
        strict=True,
    ):
        assert 0 <= z < counts[v] and 0 <= p < partitions
        assert np.all(image == 1000 * (v + 1) + z + 1)
        assert np.all(label == labels[v][z])


def test_random_slice_sampler_is_uniform_over_slices() -> None:
    volumes = _volumes([2, 6])
    batch = RandomSliceSampler(volumes, 4000, np.random.default_rng(0)).sample()
    share = (batch.volume_ids == 1).float().mean().item()
    assert share == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ValueError, match="labels"):
        RandomSliceSampler(volumes, 2, np.random.default_rng(0), labels=[np.zeros((2, 4, 4))])


@settings(max_examples=30, deadline=None)
@given(
    world_size=st.integers(1, 4),
    per_rank=st.integers(1, 3),
    extra=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_rank_volumes_split_one_draw_into_disjoint_shares(
    world_size: int, per_rank: int, extra: int, seed: int
) -> None:
    n_volumes = world_size * per_rank + extra

    def draw() -> np.ndarray:  # the same seeded draw, made on every rank
        return np.random.default_rng(seed).choice(n_volumes, world_size * per_rank, replace=False)

    shares = [rank_volumes(draw(), rank, world_size) for rank in range(world_size)]
    assert all(len(share) == per_rank for share in shares)
    assert len(set(np.concatenate(shares).tolist())) == world_size * per_rank  # disjoint
    # In rank order they are the single-process draw of world_size x m volumes.
    np.testing.assert_array_equal(np.concatenate(shares), draw())


def test_rank_volumes_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"rank must be in 0\.\.1"):
        rank_volumes(np.arange(4), 2, 2)
    with pytest.raises(ValueError, match="multiple of 3"):
        rank_volumes(np.arange(4), 0, 3)
    with pytest.raises(ValueError, match="repeats a volume"):
        rank_volumes(np.array([1, 2, 2, 3]), 0, 2)
