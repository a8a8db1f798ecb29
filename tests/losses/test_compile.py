"""Every loss a training step calls traces into one graph (``fullgraph=True``), so that a
compiled run fuses it with the network instead of launching its kernels one by one; the traced
loss and its gradient equal the eager ones. The aot_eager backend traces without generating
code, which keeps this test seconds on a CPU."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from contraseg.losses.global_contrastive import global_loss_from_pairs, global_pairs
from contraseg.losses.local_contrastive import check_neg_index, local_loss_from_pairs, local_pairs
from contraseg.losses.segmentation import SEGMENTATION_LOSSES, one_hot, segmentation_loss
from contraseg.models.heads import official_region_grid


def ids(volumes: int, partitions: int) -> tuple[torch.Tensor, ...]:
    """Two views of ``volumes`` x ``partitions`` images, as the pre-training samplers draw."""
    n = volumes * partitions
    return (
        torch.arange(n).repeat(2),
        (torch.arange(n) // partitions).repeat(2),
        (torch.arange(n) % partitions).repeat(2),
    )


def assert_traces_as_eager(loss: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
    eager_x, traced_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = loss(eager_x)
    eager.backward()
    torch._dynamo.reset()  # each case compiles afresh, not as a recompile of the last one's
    traced = torch.compile(loss, backend="aot_eager", fullgraph=True)(traced_x)
    traced.backward()
    torch.testing.assert_close(traced, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(traced_x.grad, eager_x.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("strategy", ["GR", "GD-", "GD"])
def test_the_global_loss_traces_whole(strategy: str):
    pairs = global_pairs(*ids(3, 4), strategy=strategy)
    z = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    assert_traces_as_eager(lambda x: global_loss_from_pairs(x, pairs, 0.1), z)


@pytest.mark.parametrize("strategy", ["LR", "LD"])
@pytest.mark.parametrize("negatives", ["official", "all"])
@pytest.mark.parametrize("masked", [False, True])
def test_the_local_loss_traces_whole(strategy: str, negatives: str, masked: bool):
    gen = torch.Generator().manual_seed(1)
    first, second = local_pairs(*ids(2, 3), strategy=strategy)
    grid = official_region_grid(24, 24)
    neg_index = check_neg_index(grid.neg_index, 17) if negatives == "official" else None
    valid = torch.rand(12, 17, generator=gen) < 0.7 if masked else None
    regions = torch.randn(12, 17, 8, generator=gen)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return local_loss_from_pairs(x, first, second, neg_index, 0.1, valid)

    assert_traces_as_eager(loss, regions)


@pytest.mark.parametrize("name", SEGMENTATION_LOSSES)
@pytest.mark.parametrize("target_kind", ["labels", "mixed"])
@pytest.mark.parametrize("ignored", [False, True])
def test_the_segmentation_losses_trace_whole(name: str, target_kind: str, ignored: bool):
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 4, (3, 16, 16), generator=gen)
    target = labels if target_kind == "labels" else 0.7 * one_hot(labels, 4) + 0.3 / 4
    ignore = torch.rand(3, 16, 16, generator=gen) < 0.2 if ignored else None
    fn = segmentation_loss(name, 4, check_labels=False)
    logits = torch.randn(3, 4, 16, 16, generator=gen)
    assert_traces_as_eager(lambda x: fn(x, target, ignore), logits)
