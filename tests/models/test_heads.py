"""g1, g2, the official region grid and region extraction."""

from __future__ import annotations

import pytest
import torch
from loop_oracles import extract_regions_reference

from contraseg.models.heads import (
    GlobalHead,
    LocalEmbedder,
    LocalHead,
    RegionProjector,
    extract_regions,
    official_region_grid,
    points_inside,
    region_points,
    sample_regions,
    view_points,
)

# The official code's table (models.py): anchor -> 5 negatives, in grid coordinates.
SPEC_TABLE = {
    (0, 0): [(0, 2), (1, 1), (1, 2), (2, 0), (2, 1)],
    (0, 2): [(0, 0), (0, 4), (1, 1), (1, 3), (2, 2)],
    (0, 4): [(0, 2), (1, 2), (1, 3), (2, 3), (2, 4)],
    (2, 0): [(0, 0), (1, 1), (2, 2), (4, 0), (3, 1)],
    (2, 2): [(1, 1), (1, 3), (3, 1), (3, 3), (2, 0)],
    (2, 4): [(0, 4), (2, 2), (4, 4), (1, 3), (3, 3)],
    (4, 0): [(2, 0), (2, 1), (4, 2), (3, 1), (3, 2)],
    (4, 2): [(2, 2), (4, 0), (4, 4), (3, 1), (3, 3)],
    (4, 4): [(2, 3), (2, 4), (4, 2), (3, 3), (3, 2)],
    (1, 1): [(0, 0), (0, 2), (2, 0), (2, 2), (1, 3)],
    (1, 3): [(0, 2), (0, 4), (1, 1), (2, 2), (2, 4)],
    (3, 1): [(2, 0), (2, 2), (4, 0), (4, 2), (3, 3)],
    (3, 3): [(2, 2), (2, 4), (4, 2), (4, 4), (3, 1)],
}


@pytest.mark.parametrize("batch_norm", [True, False])
def test_global_head_shapes_and_no_bias(batch_norm):
    head = GlobalHead(4608, batch_norm=batch_norm)
    assert head(torch.randn(3, 128, 6, 6)).shape == (3, 128)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4608, 1024), (1024, 128)]
    assert all(m.bias is None for m in linears)
    norms = [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert [m.num_features for m in norms] == ([1024] if batch_norm else [])


def test_global_head_batch_norm_removes_what_every_slice_shares():
    """Why the paper's batch norm keeps G^D out of its collapse: a direction that every input of
    the batch shares (the collapsed state) does not reach the embeddings through the norm, while
    the official head passes it on."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, 1, 1)
    shared = 5 * torch.randn(1, 16, 1, 1)
    with_norm, official = GlobalHead(16, 32, 8), GlobalHead(16, 32, 8, batch_norm=False)
    torch.testing.assert_close(with_norm(x + shared), with_norm(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(official(x + shared), official(x), atol=1e-2)


def test_local_head_keeps_shape_and_ends_linear():
    head = LocalHead(64)
    assert head(torch.randn(2, 64, 12, 12)).shape == (2, 64, 12, 12)
    assert isinstance(head[-1], torch.nn.Conv2d) and head[-1].bias is None
    assert head[-1].kernel_size == (1, 1)


@pytest.mark.parametrize(("side", "pixels"), [(48, [0, 11, 22, 33, 44]), (40, [0, 9, 18, 27, 36])])
def test_official_grid_matches_the_spec(side: int, pixels: list[int]):
    grid = official_region_grid(side, side, 3)
    to_grid = {p: g for g, p in enumerate(pixels)}
    points = [(to_grid[r], to_grid[c]) for r, c in grid.corners.tolist()]
    assert points[:13] == list(SPEC_TABLE)
    assert len(set(points)) == len(points) == 17
    for anchor, negs in zip(points[:13], grid.neg_index.tolist(), strict=True):
        assert [points[n] for n in negs] == SPEC_TABLE[anchor]


def test_official_grid_for_1x1_regions_and_rectangular_maps():
    grid = official_region_grid(48, 48, 1)
    assert sorted(set(grid.corners[:, 0].tolist())) == [0, 11, 23, 34, 46]
    rect = official_region_grid(24, 40, 3)
    assert rect.corners[:, 0].max() == 20 and rect.corners[:, 1].max() == 36


def test_official_1x1_lists_as_the_official_code_computes_them():
    """k1_lists="official" at 48: span 47; the negatives written as the official code's pixel
    expressions (official models.py: int(im/4), int(im/2), int(3*im/4), im with im = W - 1)."""
    im = 47
    q, h, t = int(im / 4), int(im / 2), int(3 * im / 4)
    anchors = [
        (0, 0), (0, h), (0, im), (h, 0), (h, h), (h, im), (im, 0), (im, h), (im, im),
        (q, q), (q, t), (t, q), (t, t),
    ]  # fmt: skip
    negatives = [
        [(0, h), (h, 0), (h, h), (q, q), (q, t)],
        [(0, 0), (0, im), (h, h), (q, q), (q, t)],
        [(0, h), (h, h), (h, im), (t, q), (q, t)],
        [(0, 0), (h, h), (im, 0), (q, q), (t, q)],
        [(q, q), (q, t), (t, q), (t, t), (h, 0)],
        [(0, im), (h, h), (im, im), (q, t), (t, t)],
        [(h, 0), (h, h), (im, h), (t, q), (q, q)],
        [(h, h), (im, 0), (im, im), (t, q), (t, t)],
        [(h, h), (h, im), (im, h), (t, t), (t, q)],
        [(0, 0), (0, h), (h, 0), (h, h), (q, t)],
        [(0, h), (0, im), (h, h), (h, im), (t, t)],
        [(h, 0), (h, h), (im, 0), (0, h), (q, q)],
        [(h, h), (h, im), (im, h), (im, im), (q, t)],
    ]
    grid = official_region_grid(48, 48, 1, "official")
    corners = [tuple(c) for c in grid.corners.tolist()]
    assert corners == anchors  # 13 regions: every negative is an anchor
    assert [[corners[n] for n in negs] for negs in grid.neg_index.tolist()] == negatives
    # 3x3 regions are the official 3x3 grid whichever reading of K = 1 is asked for
    three = official_region_grid(48, 48, 3, "official")
    for got, want in zip(three, official_region_grid(48, 48), strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="smaller than the region grid"):
        official_region_grid(4, 48, 1, "official")
    assert official_region_grid(5, 5, 1, "official").corners.max() == 4
    with pytest.raises(ValueError, match="k1_lists"):
        official_region_grid(48, 48, 1, "paper")


@pytest.mark.parametrize("size", [1, 3])
def test_sampled_regions_at_the_grid_are_the_extracted_regions(size: int):
    fmap = torch.randn(2, 5, 16, 20, dtype=torch.float64)
    grid = official_region_grid(16, 20, size)
    points = region_points(grid.corners, size, (16, 20))
    identity = torch.eye(2, 3, dtype=torch.float64).expand(2, 2, 3)
    mapped = view_points(points, identity)
    torch.testing.assert_close(mapped, points.expand(2, -1, -1, -1))
    sampled = sample_regions(fmap, mapped)
    torch.testing.assert_close(sampled, extract_regions(fmap, grid.corners, size))
    assert points_inside(mapped, (16, 20)).all()
    # a left-right flip of the view moves region pixels to the mirrored columns, in order
    flip = torch.tensor([[-1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64).expand(2, 2, 3)
    mirrored = sample_regions(fmap.flip(-1), view_points(points, flip))
    torch.testing.assert_close(mirrored, sampled)


def test_points_inside_means_among_the_pixel_centres():
    # a 4 x 8 map: centres at x = +-(1 - 1/8), y = +-(1 - 1/4) at the edges
    points = torch.tensor([[[[0.875, 0.75]], [[0.876, 0.0]], [[0.0, -0.751]], [[-0.875, -0.75]]]])
    assert points_inside(points.double(), (4, 8)).tolist() == [[True, False, False, True]]


@pytest.mark.parametrize("size", [1, 3])
def test_extract_regions_matches_loop_reference(size: int):
    fmap = torch.randn(3, 5, 12, 14)
    corners = torch.tensor([[0, 0], [12 - size, 14 - size], [4, 7], [4, 7], [9, 2]])
    got = extract_regions(fmap, corners, size)
    assert got.shape == (3, 5, 5 * size * size)
    assert torch.equal(got, extract_regions_reference(fmap, corners, size))


def test_extract_regions_errors():
    fmap = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="do not fit"):
        extract_regions(fmap, torch.tensor([[6, 0]]), 3)
    with pytest.raises(ValueError, match="do not fit"):
        extract_regions(fmap, torch.tensor([[-1, 0]]), 1)
    with pytest.raises(ValueError, match=r"integer \(R, 2\)"):
        extract_regions(fmap, torch.tensor([[1.0, 2.0]]), 1)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        extract_regions(fmap[0], torch.tensor([[0, 0]]), 1)


def test_the_embedder_checks_the_map_size_without_reading_its_device():
    """The corners' extent is kept on the host, so a map too small for the grid is an error
    also where the corners live on a GPU (and reading them there would wait for it)."""
    embedder = LocalEmbedder(2, torch.tensor([[0, 0], [5, 6]]), size=3, project=False)
    assert embedder.extent == (0, 8, 9)
    assert embedder(torch.randn(1, 2, 8, 9)).shape == (1, 2, 18)
    with pytest.raises(ValueError, match="do not fit in the 8x8 map"):
        embedder(torch.randn(1, 2, 8, 8))


@pytest.mark.parametrize("project", [True, False])
def test_local_embedder(project: bool):
    grid = official_region_grid(48, 48, 3)
    embedder = LocalEmbedder(8, grid.corners, size=3, project=project, out=32)
    out = embedder(torch.randn(2, 8, 48, 48))
    assert out.shape == (2, 17, 32 if project else 72)
    assert "corners" not in embedder.state_dict()
    points = region_points(grid.corners, 3, (48, 48)).expand(2, -1, -1, -1)
    fmap = torch.randn(2, 8, 48, 48)
    torch.testing.assert_close(embedder(fmap, points), embedder(fmap), rtol=1e-4, atol=1e-5)


def test_region_projector_is_shared_and_bias_free():
    proj = RegionProjector(72, 16)
    regions = torch.randn(2, 5, 72)
    out = proj(regions)
    assert out.shape == (2, 5, 16) and proj.linear.bias is None
    torch.testing.assert_close(out[1, 3], proj(regions[1, 3]))
