"""The global contrastive loss against the loop reference, SimCLR, invariances and errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loop_oracles import global_contrastive_loss_reference, nt_xent_reference

from contraseg.losses import global_chance_level, global_contrastive_loss


def layout(volumes: int, partitions: int, views: int) -> tuple[torch.Tensor, ...]:
    """Ids for ``views`` stacked blocks of ``volumes x partitions`` images."""
    n = volumes * partitions
    image = torch.arange(n).repeat(views)
    volume = (torch.arange(n) // partitions).repeat(views)
    partition = (torch.arange(n) % partitions).repeat(views)
    return image, volume, partition


LAYOUTS = [(1, 6, 2), (3, 4, 2), (2, 3, 3), (4, 2, 2), (5, 4, 2)]


@pytest.mark.parametrize("strategy", ["GR", "GD-", "GD"])
@pytest.mark.parametrize("shape", LAYOUTS)
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_matches_loop_reference(strategy: str, shape: tuple[int, int, int], temperature: float):
    image, volume, partition = layout(*shape)
    z = torch.randn(len(image), 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = global_contrastive_loss(z, image, volume, partition, strategy, temperature)
    want = global_contrastive_loss_reference(z, image, volume, partition, strategy, temperature)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [2, 5, 12])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_gr_equals_simclr_nt_xent(n: int, temperature: float):
    z = torch.randn(2 * n, 32, dtype=torch.float64)
    got = global_contrastive_loss(
        z, torch.arange(n).repeat(2), strategy="GR", temperature=temperature
    )
    torch.testing.assert_close(got, nt_xent_reference(z, temperature), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    volumes=st.integers(2, 4),
    partitions=st.integers(2, 4),
    views=st.integers(2, 3),
    strategy=st.sampled_from(["GR", "GD-", "GD"]),
    temperature=st.floats(0.05, 2.0),
    seed=st.integers(0, 2**16),
)
def test_permuting_rows_with_ids_keeps_the_loss(
    volumes, partitions, views, strategy, temperature, seed
):
    image, volume, partition = layout(volumes, partitions, views)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(len(image), 8, dtype=torch.float64, generator=gen)
    perm = torch.randperm(len(image), generator=gen)
    base = global_contrastive_loss(z, image, volume, partition, strategy, temperature)
    permuted = global_contrastive_loss(
        z[perm], image[perm], volume[perm], partition[perm], strategy, temperature
    )
    torch.testing.assert_close(base, permuted, rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    volumes=st.integers(2, 4),
    partitions=st.integers(2, 4),
    strategy=st.sampled_from(["GR", "GD-"]),
    temperature=st.floats(0.05, 2.0),
)
def test_identical_views_orthogonal_rest_gives_analytic_value(
    volumes, partitions, strategy, temperature
):
    image, volume, partition = layout(volumes, partitions, 2)
    n = volumes * partitions
    z = torch.eye(n, dtype=torch.float64)[image] * 3.0  # both views of image i = 3 e_i
    negatives = 2 * n - 2 if strategy == "GR" else 2 * n - 2 - 2 * (volumes - 1)
    want = math.log1p(negatives * math.exp(-1 / temperature))
    got = global_contrastive_loss(z, image, volume, partition, strategy, temperature)
    assert float(got) == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("strategy", ["GR", "GD-", "GD"])
def test_chance_level_is_the_loss_of_equal_embeddings(strategy: str):
    image, volume, partition = layout(3, 4, 2)
    got = global_contrastive_loss(torch.ones(len(image), 5), image, volume, partition, strategy)
    assert float(got) == pytest.approx(global_chance_level(image, volume, partition, strategy))


def test_chance_level_values():
    image, volume, partition = layout(3, 4, 2)  # 24 rows
    assert global_chance_level(image) == pytest.approx(math.log(23))
    assert global_chance_level(image, volume, partition, "GD-") == pytest.approx(math.log(19))
    # GD: 1 view partner + 4 cross-volume partners, 18 negatives for every pair.
    assert global_chance_level(image, volume, partition, "GD") == pytest.approx(math.log(19))


@pytest.mark.parametrize("strategy", ["GR", "GD-", "GD"])
def test_gradients_reach_every_row(strategy: str):
    image, volume, partition = layout(3, 4, 2)
    z = torch.randn(len(image), 16, requires_grad=True)
    global_contrastive_loss(z, image, volume, partition, strategy).backward()
    assert z.grad is not None
    assert (z.grad.abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("strategy", ["GR", "GD-", "GD"])
def test_finite_under_bf16_autocast_with_extreme_similarities(strategy: str):
    image, volume, partition = layout(3, 4, 2)
    base = torch.randn(len(image), 64) * 1e4
    base[1::2] = base[0::2]  # many exactly equal rows: similarities at their maximum
    z = base.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = torch.nn.functional.linear(z, torch.eye(64))  # bf16 under autocast
        assert projected.dtype == torch.bfloat16
        loss = global_contrastive_loss(projected, image, volume, partition, strategy, 0.01)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_errors_name_the_problem():
    image, volume, partition = layout(2, 2, 2)
    z = torch.randn(len(image), 4)
    with pytest.raises(ValueError, match="unknown global strategy"):
        global_contrastive_loss(z, image, volume, partition, "SimCLR")
    with pytest.raises(ValueError, match="needs volume_ids and partition_ids"):
        global_contrastive_loss(z, image, strategy="GD")
    with pytest.raises(ValueError, match="needs volume_ids and partition_ids"):
        global_contrastive_loss(z, image, partition_ids=partition, strategy="GD-")
    with pytest.raises(ValueError, match="no positive"):
        global_contrastive_loss(z, torch.arange(len(image)))
    with pytest.raises(ValueError, match="no negative"):
        global_contrastive_loss(z[:2], [0, 0])
    with pytest.raises(ValueError, match=r"z must be \(B, D\)"):
        global_contrastive_loss(z[0], image)
    with pytest.raises(ValueError, match="entries for"):
        global_contrastive_loss(z, image[:-1])
    with pytest.raises(ValueError, match="volume_ids must have shape"):
        global_contrastive_loss(z, image, volume[:-1], partition, "GD")
    with pytest.raises(ValueError, match="must be integers"):
        global_contrastive_loss(z, image.float())
    with pytest.raises(ValueError, match="temperature"):
        global_contrastive_loss(z, image, temperature=0.0)
    wrong = partition.clone()
    wrong[0] = 1 - wrong[0]
    with pytest.raises(ValueError, match="same image_id have different"):
        global_contrastive_loss(z, image, volume, wrong, "GD")
