"""Two gloo ranks of B images give the loss and gradients of one process of 2 x B images.

One spawn of two CPU processes runs every case (a few seconds in all); the parent compares
their results with the single-process loss on the concatenated batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from contraseg.data.sampling import rank_volumes
from contraseg.losses import global_contrastive_loss, local_contrastive_loss
from contraseg.losses.distributed import (
    all_gather_rows,
    all_gather_with_grad,
    gather_contrastive_batch,
    gather_ids,
    rank_and_world_size,
)

WORLD = 2
PARTITIONS = 3
VOLUMES_PER_RANK = 2
IMAGES = VOLUMES_PER_RANK * PARTITIONS  # per rank, one slice per (volume, partition)
DRAW = np.array([5, 1, 7, 3])  # one draw of WORLD x VOLUMES_PER_RANK distinct volumes
FEATURES, DIM, REGIONS = 5, 4, 6
TABLE = torch.tensor([[1, 2, 5], [0, 3, 4], [4, 5, 1]])  # (A=3, n_neg=3) negatives of 6 regions
# (strategy, negatives table, regions skipped as by views with their own transform)
CASES = [
    ("GR", None, False),
    ("GD-", None, False),
    ("GD", None, False),
    ("LR", None, False),
    ("LR", TABLE, False),
    ("LD", None, False),
    ("LD", TABLE, False),
    ("LR", TABLE, True),
    ("LD", None, True),
]
# which regions each view shows, (2 views, WORLD * IMAGES images, REGIONS)
VALID = torch.rand(2, WORLD * IMAGES, REGIONS, generator=torch.Generator().manual_seed(3)) < 0.7

Case = tuple[str, torch.Tensor | None, bool]


def _name(case: Case) -> str:
    strategy, table, masked = case
    if strategy.startswith("G"):
        return strategy
    return f"{strategy}-{'all' if table is None else 3}{'-masked' if masked else ''}"


def _views(strategy: str) -> torch.Tensor:
    """(2 views, WORLD * IMAGES images, ...) inputs; local ones have REGIONS rows per image."""
    regions = () if strategy.startswith("G") else (REGIONS,)
    shape = (2, WORLD * IMAGES, *regions, FEATURES)
    return torch.randn(shape, generator=torch.Generator().manual_seed(len(strategy) + 11))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, DIM)  # per row (global) or per region (local)


def _loss(case: Case, embeddings: torch.Tensor, ids, valid: torch.Tensor) -> torch.Tensor:
    strategy, table, masked = case
    if strategy.startswith("G"):
        return global_contrastive_loss(embeddings, *ids, strategy=strategy, temperature=0.2)
    return local_contrastive_loss(
        embeddings, *ids, strategy=strategy, neg_index=table, valid=valid if masked else None
    )


def _volume_ids(volumes: np.ndarray) -> torch.Tensor:
    """Partition-sampler order, vol0:p0..p(S-1), vol1:..., for both views."""
    return torch.from_numpy(np.repeat(volumes, PARTITIONS)).repeat(2)


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    rows = slice(rank * IMAGES, (rank + 1) * IMAGES)
    for case in CASES:
        views = _views(case[0])
        x = torch.cat([views[0, rows], views[1, rows]]).requires_grad_()  # [view 1 | view 2]
        model = DistributedDataParallel(_model())
        z = model(x)
        image_ids = 7 * torch.arange(IMAGES).repeat(2) + 3  # local ids: any integers
        volume_ids = _volume_ids(rank_volumes(DRAW, rank, WORLD))
        partition_ids = torch.arange(PARTITIONS).repeat(2 * VOLUMES_PER_RANK)
        gathered, ids = gather_contrastive_batch(z, image_ids, volume_ids, partition_ids)
        valid = all_gather_rows(torch.cat([VALID[0, rows], VALID[1, rows]]))
        loss = _loss(case, gathered, ids, valid)
        loss.backward()  # DDP averages the parameter gradients over the ranks
        name = _name(case)
        results[f"{name}/loss"] = loss.detach()
        results[f"{name}/x"] = x.grad
        for i, p in enumerate(model.parameters()):
            results[f"{name}/param{i}"] = p.grad
    # Ranks with different losses: the backward sums the gradients of all ranks' losses.
    t = torch.arange(6.0).reshape(3, 2).add(10 * rank).requires_grad_()
    gathered = all_gather_with_grad(t)
    weight = torch.randn(WORLD * 3, 2, generator=torch.Generator().manual_seed(rank))
    (gathered * weight).sum().backward()
    results["raw/gathered"] = gathered.detach()
    results["raw/grad"] = t.grad
    results["raw/rank"] = torch.tensor(rank_and_world_size())
    results["raw/rows"] = all_gather_rows(torch.tensor([rank == 0, True, rank == 1]))
    dist.destroy_process_group()
    torch.save(results, f"{out}/rank{rank}.pt")


def _single_process(case: Case) -> dict[str, torch.Tensor]:
    views = _views(case[0])
    x = torch.cat([views[0], views[1]]).requires_grad_()  # [view 1 of all | view 2 of all]
    model = _model()
    ids = (
        torch.arange(WORLD * IMAGES).repeat(2),
        _volume_ids(DRAW),
        torch.arange(PARTITIONS).repeat(2 * WORLD * VOLUMES_PER_RANK),
    )
    loss = _loss(case, model(x), ids, torch.cat([VALID[0], VALID[1]]))
    loss.backward()
    params = {f"param{i}": p.grad for i, p in enumerate(model.parameters())}
    return {"loss": loss.detach(), "x": x.grad, **params}


def _rows_of_rank(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank ``rank``'s [view 1 | view 2] rows of the single-process [view 1 | view 2] tensor."""
    half = WORLD * IMAGES
    rows = torch.arange(rank * IMAGES, (rank + 1) * IMAGES)
    return x[torch.cat([rows, rows + half])]


def _close(got: torch.Tensor, want: torch.Tensor, where: str) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m: f"{where}: {m}")


def test_two_ranks_match_one_process_on_the_concatenated_batch(tmp_path: Path, monkeypatch):
    # The spawned children import this module by name (importlib mode): put its root on the path.
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2]))
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for case in CASES:
        name = _name(case)
        want = _single_process(case)
        for rank, got in enumerate(ranks):
            _close(got[f"{name}/loss"], want["loss"], f"{name} rank {rank} loss")
            for key in ("param0", "param1"):
                _close(got[f"{name}/{key}"], want[key], f"{name} rank {rank} {key}")
            # Each rank's input gets the gradient of the sum of the WORLD (equal) losses.
            _close(
                got[f"{name}/x"] / WORLD, _rows_of_rank(want["x"], rank), f"{name} rank {rank} x"
            )
    blocks = [torch.arange(6.0).reshape(3, 2) + 10 * r for r in range(WORLD)]
    weights = [
        torch.randn(WORLD * 3, 2, generator=torch.Generator().manual_seed(r)) for r in range(WORLD)
    ]
    for rank, got in enumerate(ranks):
        assert got["raw/rank"].tolist() == [rank, WORLD]
        assert got["raw/rows"].tolist() == [True, True, False, False, True, True]
        torch.testing.assert_close(got["raw/gathered"], torch.cat(blocks), rtol=0, atol=0)
        want_grad = sum(w[rank * 3 : (rank + 1) * 3] for w in weights)
        _close(got["raw/grad"], want_grad, f"rank {rank} gather backward")


def _check_identity() -> None:
    z = torch.randn(4, 3, requires_grad=True)
    assert all_gather_with_grad(z) is z
    mask = torch.tensor([True, False])
    assert all_gather_rows(mask) is mask
    image_ids, volume_ids, partition_ids = [5, 9, 5, 9], torch.tensor([2, 1, 2, 1]), None
    gathered, ids = gather_contrastive_batch(z, image_ids, volume_ids, partition_ids)
    assert gathered is z
    assert ids[0].tolist() == image_ids and ids[0].dtype == torch.long
    assert ids[1].tolist() == [2, 1, 2, 1] and ids[2] is None


def test_gather_is_the_identity_without_a_process_group():
    assert not dist.is_initialized()
    assert rank_and_world_size() == (0, 1)
    _check_identity()


def test_gather_is_the_identity_in_a_group_of_one(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert rank_and_world_size() == (0, 1)
        _check_identity()
    finally:
        dist.destroy_process_group()


def test_ids_are_checked_before_any_collective():
    z = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="3 entries for 4 embeddings"):
        gather_contrastive_batch(z, [0, 1, 0])
    with pytest.raises(ValueError, match="volume_ids must have shape"):
        gather_ids([0, 1, 0, 1], volume_ids=[0, 1])
    with pytest.raises(ValueError, match="image_ids must be integers"):
        gather_ids(torch.zeros(4))
