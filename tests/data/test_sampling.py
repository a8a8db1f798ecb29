"""Partition and random slice samplers: counts, ids, partition membership, no empty slots;
the slice pool on the device or on the host; reproducible draws, resumable from the generator's
state; ranks that share one draw."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contraseg.data.sampling import (
    PartitionSampler,
    RandomSliceSampler,
    SliceBatch,
    SlicePool,
    partition_bounds,
    rank_volumes,
)
from contraseg.errors import InputError
from contraseg.losses import global_pair_masks


def _volumes(slice_counts: list[int], size: int = 4) -> list[np.ndarray]:
    """Volume i, slice z holds the value 1000 * (i + 1) + z + 1 everywhere: never zero."""
    return [
        np.broadcast_to(
            (1000.0 * (i + 1) + np.arange(n) + 1)[:, None, None, None], (n, 1, size, size)
        ).astype(np.float32)
        for i, n in enumerate(slice_counts)
    ]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pool(slice_counts: list[int], labels: bool = False, budget: int | None = None) -> SlicePool:
    volumes = _volumes(slice_counts)
    masks = [(v[:, 0] % 4).astype(np.uint8) for v in volumes] if labels else None
    return SlicePool(volumes, masks, budget=budget)


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
    sampler = PartitionSampler(
        _pool(counts), partitions, m, _generator(data.draw(st.integers(0, 99)))
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
    with pytest.raises(ValueError, match="3 volumes per batch need that many distinct volumes"):
        PartitionSampler(_pool([8, 8]), 4, 3, _generator(0))
    with pytest.raises(ValueError, match="2 volumes per batch x 2 ranks need"):
        PartitionSampler(_pool([8, 8, 8]), 4, 2, _generator(0), rank=1, world_size=2)
    with pytest.raises(InputError, match="fewer than 4") as info:
        PartitionSampler(_pool([8, 3]), 4, 1, _generator(0), names=["a", "b"])
    assert info.value.path == "b"


def test_partition_sampler_covers_every_partition_slice() -> None:
    sampler = PartitionSampler(_pool([9, 10]), 3, 2, _generator(0))
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
    pool = _pool(counts, labels=True)
    labels = pool.labels
    assert labels is not None
    batch = RandomSliceSampler(pool, batch_size, _generator(seed), partitions=partitions).sample()
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
    batch = RandomSliceSampler(_pool([2, 6]), 4000, _generator(0)).sample()
    share = (batch.volume_ids == 1).float().mean().item()
    assert share == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ValueError, match="labels"):
        SlicePool(_volumes([2, 6]), [np.zeros((2, 4, 4))])


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


def _same_batch(a: SliceBatch, b: SliceBatch) -> None:
    for name in ("images", "volume_ids", "partition_ids", "slice_ids", "labels"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x.cpu(), y.cpu()), name


def _samplers(pool: SlicePool, seed: int, rank: int = 0, world_size: int = 1, m: int = 2):
    return [
        PartitionSampler(pool, 3, m, _generator(seed), rank=rank, world_size=world_size),
        RandomSliceSampler(
            pool, 5, _generator(seed), partitions=3, rank=rank, world_size=world_size
        ),
    ]


def test_a_pool_over_its_budget_gives_the_same_batches_from_the_host() -> None:
    resident, on_host = _pool([7, 9, 6, 8], labels=True), _pool([7, 9, 6, 8], True, budget=0)
    assert resident.resident and not on_host.resident
    for a, b in zip(_samplers(resident, 5), _samplers(on_host, 5), strict=True):
        for _ in range(3):
            _same_batch(a.sample(), b.sample())


def test_a_pool_on_the_host_gathers_each_next_batch_in_the_background(monkeypatch) -> None:
    """After the first batch, each batch of a host pool was gathered by the background thread
    while the one before was in use; the sampling generator is never ahead of the batches
    handed out (a checkpoint saves it)."""
    threads: list[tuple[SlicePool, str]] = []
    gather = SlicePool._gather_on_host

    def recording(self, vol, sl):
        threads.append((self, threading.current_thread().name))
        return gather(self, vol, sl)

    monkeypatch.setattr(SlicePool, "_gather_on_host", recording)
    for index in range(2):
        resident, on_host = _pool([7, 9, 6, 8], labels=True), _pool([7, 9, 6, 8], True, budget=0)
        a, b = _samplers(resident, 5)[index], _samplers(on_host, 5)[index]
        for _ in range(4):
            _same_batch(a.sample(), b.sample())
            assert torch.equal(a.generator.get_state(), b.generator.get_state())
        names = [name for pool, name in threads if pool is on_host]
        assert len(names) in (4, 5)  # the fifth batch's gather may not have begun
        assert names[0] == threading.main_thread().name
        assert all(name.startswith("contraseg-gather") for name in names[1:])


def test_a_batch_other_than_the_prefetched_one_is_gathered_right() -> None:
    """Should anything draw from the sampling generator between two batches, the slices
    gathered ahead are not the ones asked for: they are dropped and the right ones gathered."""
    resident, on_host = _pool([7, 9, 6, 8], labels=True), _pool([7, 9, 6, 8], True, budget=0)
    for a, b in zip(_samplers(resident, 6), _samplers(on_host, 6), strict=True):
        _same_batch(a.sample(), b.sample())
        for sampler in (a, b):
            torch.rand(3, generator=sampler.generator)
        _same_batch(a.sample(), b.sample())


def _sample_three(sampler) -> None:
    for _ in range(3):
        sampler.sample()


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform"
)
def test_a_forked_child_gathers_ahead_with_a_thread_of_its_own() -> None:
    """A process forked after a host pool started its gathering thread has no such thread:
    waiting on the parent's would never end, so the child starts its own."""
    sampler = _samplers(_pool([7, 9, 6, 8], True, budget=0), 5)[1]
    sampler.sample()  # the gathering thread runs, and holds the next batch
    child = multiprocessing.get_context("fork").Process(target=_sample_three, args=(sampler,))
    child.start()
    child.join(timeout=30)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0


def test_a_sampler_resumes_from_its_generator_state() -> None:
    """What a checkpoint holds (the generator's state) is all a resumed run needs."""
    pool = _pool([7, 9, 6, 8], labels=True)
    for index in range(2):
        straight = _samplers(pool, 11)[index]
        for _ in range(4):
            straight.sample()
        saved = straight.generator.get_state()
        expected = [straight.sample() for _ in range(3)]
        resumed = _samplers(pool, 0)[index]
        resumed.generator.set_state(saved)
        for want in expected:
            _same_batch(resumed.sample(), want)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_one_draw_of_the_single_process_batch(world_size: int) -> None:
    """N ranks of m volumes (B slices) draw, in rank order, the batch of one process of N x m
    volumes (N x B slices), the partition sampler's ranks holding distinct volumes."""
    pool = _pool([7, 9, 6, 8, 10, 6, 7], labels=True)
    single = PartitionSampler(pool, 3, 2 * world_size, _generator(4))
    single_random = RandomSliceSampler(pool, 5 * world_size, _generator(4), partitions=3)
    ranks = [_samplers(pool, 4, rank, world_size) for rank in range(world_size)]
    for _ in range(3):
        for one, index in ((single, 0), (single_random, 1)):
            whole = one.sample()
            parts = [samplers[index].sample() for samplers in ranks]
            joined = SliceBatch(
                *(
                    torch.cat([getattr(p, name) for p in parts])
                    for name in ("images", "volume_ids", "partition_ids", "slice_ids", "labels")
                )
            )
            _same_batch(joined, whole)
            if index == 0:  # the partition sampler's ranks hold distinct volumes
                shares = [set(p.volume_ids.tolist()) for p in parts]
                assert len(set().union(*shares)) == sum(len(share) for share in shares)


def test_partition_layout_relates_rows_as_every_batch_does() -> None:
    """The losses' pairs are found once from ``layout()``: they must be those of any batch."""
    pool = _pool([7, 9, 6, 8, 10])
    for rank in range(2):
        sampler = PartitionSampler(pool, 3, 2, _generator(8), rank=rank, world_size=2)
        volumes, partitions = sampler.layout()
        n = len(volumes)
        images = torch.arange(n).repeat(2)
        for strategy in ("GD", "GD-"):
            want = global_pair_masks(images, volumes.repeat(2), partitions.repeat(2), strategy)
            for _ in range(5):
                batch = sampler.sample()
                got = global_pair_masks(
                    images, batch.volume_ids.repeat(2), batch.partition_ids.repeat(2), strategy
                )
                assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        assert torch.equal(volumes.unique(), torch.arange(rank * 2, rank * 2 + 2))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_pool_on_the_gpu_draws_what_the_cpu_pool_draws() -> None:
    volumes = _volumes([7, 9, 6, 8])
    labels = [(v[:, 0] % 4).astype(np.uint8) for v in volumes]
    cpu = SlicePool(volumes, labels)
    for budget in (None, 0):  # resident on the GPU, then gathered on the host and copied
        gpu = SlicePool(volumes, labels, "cuda", budget)
        assert gpu.resident == (budget is None)
        for a, b in zip(_samplers(cpu, 3), _samplers(gpu, 3), strict=True):
            for _ in range(3):
                batch = b.sample()
                assert batch.images.is_cuda and batch.labels is not None and batch.labels.is_cuda
                _same_batch(a.sample(), batch)
