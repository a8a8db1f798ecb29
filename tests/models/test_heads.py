"""g1, g2, the official region grid and region extraction."""

from __future__ import annotations

import pytest
import torch

from contraseg.losses.reference import extract_regions_reference
from contraseg.models.heads import (
    GlobalHead,
    LocalEmbedder,
    LocalHead,
    RegionProjector,
    extract_regions,
    official_region_grid,
)

# method_spec 4.1, anchor -> 5 negatives, in grid coordinates.
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


def test_global_head_shapes_and_no_bias():
    head = GlobalHead(4608)
    assert head(torch.randn(3, 128, 6, 6)).shape == (3, 128)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4608, 1024), (1024, 128)]
    assert all(m.bias is None for m in linears)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules())


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


@pytest.mark.parametrize("project", [True, False])
def test_local_embedder(project: bool):
    grid = official_region_grid(48, 48, 3)
    embedder = LocalEmbedder(8, grid.corners, size=3, project=project, out=32)
    out = embedder(torch.randn(2, 8, 48, 48))
    assert out.shape == (2, 17, 32 if project else 72)
    assert "corners" not in embedder.state_dict()


def test_region_projector_is_shared_and_bias_free():
    proj = RegionProjector(72, 16)
    regions = torch.randn(2, 5, 72)
    out = proj(regions)
    assert out.shape == (2, 5, 16) and proj.linear.bias is None
    torch.testing.assert_close(out[1, 3], proj(regions[1, 3]))
