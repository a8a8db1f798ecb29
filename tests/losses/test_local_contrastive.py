"""The local contrastive loss against the loop reference, invariances and errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loop_oracles import extract_regions_reference, local_contrastive_loss_reference

from contraseg.losses import local_chance_level, local_contrastive_loss
from contraseg.losses.local_contrastive import masked_local_chance_level
from contraseg.models.heads import extract_regions, official_region_grid


def layout(volumes: int, partitions: int, views: int = 2) -> tuple[torch.Tensor, ...]:
    n = volumes * partitions
    image = torch.arange(n).repeat(views)
    volume = (torch.arange(n) // partitions).repeat(views)
    partition = (torch.arange(n) % partitions).repeat(views)
    return image, volume, partition


@pytest.mark.parametrize("strategy", ["LR", "LD"])
@pytest.mark.parametrize("negatives", ["official", "all"])
@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize(
    ("shape", "temperature"), [((2, 3, 2), 0.1), ((3, 2, 2), 0.5), ((2, 2, 3), 1.0)]
)
def test_matches_loop_reference_from_feature_maps(strategy, negatives, size, shape, temperature):
    """Region extraction + loss against the loop versions of both, from a random feature map."""
    image, volume, partition = layout(*shape)
    gen = torch.Generator().manual_seed(7)
    fmap = torch.randn(len(image), 4, 16, 20, dtype=torch.float64, generator=gen)
    grid = official_region_grid(16, 20, size)
    neg_index = grid.neg_index if negatives == "official" else None
    got = local_contrastive_loss(
        extract_regions(fmap, grid.corners, size),
        image, volume, partition, strategy, neg_index, temperature,
    )  # fmt: skip
    want = local_contrastive_loss_reference(
        extract_regions_reference(fmap, grid.corners, size),
        image, volume, partition, strategy, neg_index, temperature,
    )  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["LR", "LD"])
def test_matches_reference_with_random_regions_and_negatives(strategy: str):
    image, volume, partition = layout(2, 2)
    gen = torch.Generator().manual_seed(1)
    f = torch.randn(len(image), 9, 6, dtype=torch.float64, generator=gen)
    neg_index = torch.stack([(torch.randperm(8, generator=gen)[:3] + u + 1) % 9 for u in range(5)])
    got = local_contrastive_loss(f, image, volume, partition, strategy, neg_index, 0.2)
    want = local_contrastive_loss_reference(f, image, volume, partition, strategy, neg_index, 0.2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    volumes=st.integers(2, 3),
    partitions=st.integers(1, 3),
    strategy=st.sampled_from(["LR", "LD"]),
    official=st.booleans(),
    temperature=st.floats(0.05, 2.0),
    seed=st.integers(0, 2**16),
)
def test_permuting_images_with_ids_keeps_the_loss(
    volumes, partitions, strategy, official, temperature, seed
):
    image, volume, partition = layout(volumes, partitions)
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(len(image), 17, 5, dtype=torch.float64, generator=gen)
    neg_index = official_region_grid(24, 24).neg_index if official else None
    perm = torch.randperm(len(image), generator=gen)
    base = local_contrastive_loss(f, image, volume, partition, strategy, neg_index, temperature)
    permuted = local_contrastive_loss(
        f[perm], image[perm], volume[perm], partition[perm], strategy, neg_index, temperature
    )
    torch.testing.assert_close(base, permuted, rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(images=st.integers(1, 4), official=st.booleans(), temperature=st.floats(0.05, 2.0))
def test_identical_views_orthogonal_regions_give_analytic_value(images, official, temperature):
    n_regions = 17
    image = torch.arange(images).repeat(2)
    # Region u of image i (either view) is a basis vector of its own: positives have cosine 1,
    # every negative cosine 0.
    basis = torch.eye(images * n_regions, dtype=torch.float64).reshape(images, n_regions, -1)
    f = basis[image]
    neg_index = official_region_grid(24, 24).neg_index if official else None
    n_neg = 5 if official else n_regions - 1
    want = math.log1p(2 * n_neg * math.exp(-1 / temperature))
    got = local_contrastive_loss(f, image, neg_index=neg_index, temperature=temperature)
    assert float(got) == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("official", [True, False])
def test_chance_level_is_the_loss_of_equal_embeddings(official: bool):
    neg_index = official_region_grid(24, 24).neg_index if official else None
    image, volume, partition = layout(3, 2)
    got = local_contrastive_loss(
        torch.ones(len(image), 17, 3), image, volume, partition, "LD", neg_index
    )
    assert float(got) == pytest.approx(local_chance_level(17, neg_index))
    assert local_chance_level(17, neg_index) == pytest.approx(math.log(11 if official else 33))


@pytest.mark.parametrize("strategy", ["LR", "LD"])
@pytest.mark.parametrize("official", [True, False])
def test_gradients_reach_every_image_and_region(strategy: str, official: bool):
    image, volume, partition = layout(2, 3)
    f = torch.randn(len(image), 17, 8, requires_grad=True)
    neg_index = official_region_grid(24, 24).neg_index if official else None
    local_contrastive_loss(f, image, volume, partition, strategy, neg_index).backward()
    assert f.grad is not None
    assert (f.grad.abs().sum(dim=2) > 0).all()


@pytest.mark.parametrize("official", [True, False])
def test_finite_under_bf16_autocast_with_extreme_similarities(official: bool):
    image = torch.arange(4).repeat(2)
    base = torch.randn(4, 17, 32) * 1e4
    base[:, 1:] = base[:, :1]  # every region equal: all similarities at their maximum
    f = base[image].clone().requires_grad_(True)
    neg_index = official_region_grid(24, 24).neg_index if official else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = torch.nn.functional.linear(f, torch.eye(32))
        assert projected.dtype == torch.bfloat16
        loss = local_contrastive_loss(projected, image, neg_index=neg_index, temperature=0.01)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(f.grad).all()


def test_errors_name_the_problem():
    image, volume, partition = layout(2, 2)
    f = torch.randn(len(image), 17, 4)
    neg = official_region_grid(24, 24).neg_index
    with pytest.raises(ValueError, match="unknown local strategy"):
        local_contrastive_loss(f, image, volume, partition, "LX", neg)
    with pytest.raises(ValueError, match="needs volume_ids and partition_ids"):
        local_contrastive_loss(f, image, strategy="LD", neg_index=neg)
    with pytest.raises(ValueError, match="no positive"):
        local_contrastive_loss(f, torch.arange(len(image)), neg_index=neg)
    with pytest.raises(ValueError, match=r"embeddings must be \(B, R, D\)"):
        local_contrastive_loss(f[0], image)
    with pytest.raises(ValueError, match="entries for"):
        local_contrastive_loss(f, image[:-1])
    with pytest.raises(ValueError, match="own negatives"):
        local_contrastive_loss(f, image, neg_index=torch.tensor([[1, 2], [1, 0]]))
    with pytest.raises(ValueError, match="outside"):
        local_contrastive_loss(f, image, neg_index=torch.tensor([[1, 17]]))
    with pytest.raises(ValueError, match="integer"):
        local_contrastive_loss(f, image, neg_index=torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="at least 2 regions"):
        local_contrastive_loss(f[:, :1], image)
    with pytest.raises(ValueError, match="temperature"):
        local_contrastive_loss(f, image, temperature=-1.0)


def test_feature_map_smaller_than_region_grid():
    with pytest.raises(ValueError, match="smaller than the region grid"):
        official_region_grid(7, 48, 3)
    with pytest.raises(ValueError, match="smaller than the region grid"):
        official_region_grid(48, 5, 1)
    grid = official_region_grid(48, 48, 3)
    with pytest.raises(ValueError, match="smaller than the region grid"):
        extract_regions(torch.zeros(1, 2, 40, 40), grid.corners, 3)


# ---------------------------------------------------------------------------------------------
# valid: regions that fall outside a view (loss.views=transformed) are skipped


def masked_reference(f, image, volume, partition, strategy, neg_index, temperature, valid):
    """Loops over ordered pairs, anchors and negatives, skipping what ``valid`` excludes."""

    def sim(x, y):
        return torch.exp(torch.dot(x, y) / (x.norm() * y.norm()) / temperature)

    n_regions = f.shape[1]
    anchors = n_regions if neg_index is None else neg_index.shape[0]
    terms = []
    for a in range(len(image)):
        for b in range(len(image)):
            same_image = image[a] == image[b]
            partner = partition[a] == partition[b] and volume[a] != volume[b]
            if a == b or not (same_image or (strategy == "LD" and partner)):
                continue
            for u in range(anchors):
                if not (valid[a, u] and valid[b, u]):
                    continue
                negs = (
                    [n for n in range(n_regions) if n != u] if neg_index is None else neg_index[u]
                )
                den = [sim(f[a, u], f[a, n]) for n in negs if valid[a, n]]
                den += [sim(f[a, u], f[b, n]) for n in negs if valid[b, n]]
                if den:
                    pos = sim(f[a, u], f[b, u])
                    terms.append(-torch.log(pos / (pos + sum(den))))
    return torch.stack(terms).mean() if terms else torch.zeros((), dtype=f.dtype)


@pytest.mark.parametrize("strategy", ["LR", "LD"])
@pytest.mark.parametrize("official", [True, False])
@pytest.mark.parametrize("keep", [0.0, 0.3, 0.7, 1.0])
def test_masked_loss_matches_loop_reference(strategy: str, official: bool, keep: float):
    image, volume, partition = layout(2, 2)
    gen = torch.Generator().manual_seed(int(keep * 10) + official)
    f = torch.randn(len(image), 17, 6, dtype=torch.float64, generator=gen)
    valid = torch.rand(len(image), 17, generator=gen) < keep
    neg_index = official_region_grid(24, 24).neg_index if official else None
    args = (image, volume, partition, strategy, neg_index, 0.3)
    got = local_contrastive_loss(f, *args, valid=valid)
    torch.testing.assert_close(got, masked_reference(f, *args, valid), rtol=1e-9, atol=1e-12)
    if keep == 1.0:  # nothing skipped: the loss of the unmasked form
        torch.testing.assert_close(got, local_contrastive_loss(f, *args), rtol=1e-12, atol=0)


def test_skipped_regions_do_not_reach_the_loss_or_its_gradient():
    image = torch.arange(3).repeat(2)
    gen = torch.Generator().manual_seed(5)
    f = torch.randn(6, 17, 4, generator=gen, requires_grad=True)
    valid = torch.rand(6, 17, generator=gen) < 0.6
    neg_index = official_region_grid(24, 24).neg_index
    loss = local_contrastive_loss(f, image, neg_index=neg_index, valid=valid)
    loss.backward()
    assert torch.isfinite(f.grad).all() and (f.grad[~valid] == 0).all()
    changed = f.detach().clone()
    changed[~valid] = torch.randn(int((~valid).sum()), 4, generator=gen)
    again = local_contrastive_loss(changed, image, neg_index=neg_index, valid=valid)
    torch.testing.assert_close(again, loss.detach())
    # with nothing left the loss is 0 and its gradient 0, not NaN
    empty = local_contrastive_loss(f, image, valid=torch.zeros(6, 17, dtype=torch.bool))
    empty.backward()
    assert float(empty.detach()) == 0.0 and torch.isfinite(f.grad).all()


@pytest.mark.parametrize("official", [True, False])
def test_masked_chance_level_is_the_loss_of_equal_embeddings(official: bool):
    image, volume, partition = layout(3, 2)
    valid = torch.rand(len(image), 17, generator=torch.Generator().manual_seed(2)) < 0.5
    neg_index = official_region_grid(24, 24).neg_index if official else None
    args = (image, volume, partition, "LD", neg_index)
    equal = local_contrastive_loss(torch.ones(len(image), 17, 3), *args, valid=valid)
    chance = masked_local_chance_level(valid, *args)
    torch.testing.assert_close(chance, equal)
    full = masked_local_chance_level(torch.ones(len(image), 17, dtype=torch.bool), *args)
    assert float(full) == pytest.approx(local_chance_level(17, neg_index))


def test_valid_must_be_a_bool_mask_per_region():
    image = torch.arange(2).repeat(2)
    f = torch.randn(4, 17, 3)
    with pytest.raises(ValueError, match="valid must be a bool"):
        local_contrastive_loss(f, image, valid=torch.ones(4, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid must be a bool"):
        local_contrastive_loss(f, image, valid=torch.ones(4, 17))
