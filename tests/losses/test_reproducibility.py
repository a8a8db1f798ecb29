"""Gradients of the contrastive losses are bitwise reproducible on a multi-threaded CPU, which
is what lets a resumed run end with the same weights as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from contraseg.losses import global_contrastive_loss, local_contrastive_loss
from contraseg.models.heads import official_region_grid


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _ids():
    n = torch.arange(16)
    return n.repeat(2), (n // 4).repeat(2), (n % 4).repeat(2)


def _same_gradients(loss_of, tensor, repeats: int = 6) -> bool:
    grads = []
    for _ in range(repeats):
        leaf = tensor.clone().requires_grad_()
        loss_of(leaf).backward()
        grads.append(leaf.grad)
    return all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize("strategy", ["GR", "GD-", "GD"])
def test_global_loss_gradients_are_reproducible(two_threads, strategy):
    z = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    assert _same_gradients(lambda t: global_contrastive_loss(t, *_ids(), strategy=strategy), z)


@pytest.mark.parametrize("strategy", ["LR", "LD"])
@pytest.mark.parametrize("official", [True, False])
def test_local_loss_gradients_are_reproducible(two_threads, strategy, official):
    neg_index = official_region_grid(16, 16, 3).neg_index if official else None
    regions = torch.randn(32, 17, 128, generator=torch.Generator().manual_seed(0))
    assert _same_gradients(
        lambda t: local_contrastive_loss(t, *_ids(), strategy=strategy, neg_index=neg_index),
        regions,
    )
