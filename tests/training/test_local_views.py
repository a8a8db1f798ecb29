"""Stage 2 beyond the paper: transformed local views, encoder batch norm, the official 1x1
lists; and the Cityscapes fine-tuning augmentation, end to end on tiny data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from reader_kit import save_cityscapes_frame

from contraseg.config import (
    FinetuneRun,
    LocalAugmentConfig,
    PretrainGlobalRun,
    PretrainLocalRun,
    load_config,
)
from contraseg.data.augment import sample_resized_crop, transformed_view
from contraseg.errors import InputError
from contraseg.losses import local_contrastive_loss
from contraseg.losses.local_contrastive import masked_local_chance_level
from contraseg.models.heads import (
    extract_regions,
    official_region_grid,
    points_inside,
    region_points,
    sample_regions,
    view_points,
)
from contraseg.training.checkpoint import load_weights
from contraseg.training.stages import run_finetune, run_pretrain_global, run_pretrain_local


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# geometry of the transformed views


def test_matched_regions_of_two_views_hold_the_same_pixels():
    """Region u sampled where each view shows it holds the original's region u.

    The pattern is a different linear ramp per channel, which bilinear sampling reproduces
    exactly, so any error in the crop, scale or flip bookkeeping shows; the regions are taken
    on a 4x coarser grid, as on a feature map.
    """
    height, width = 64, 96
    y, x = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )
    image = torch.stack([0.3 * x + 0.1 * y, -0.2 * x + 0.5 * y])[None].repeat(8, 1, 1, 1)
    config = LocalAugmentConfig(brightness=0.0, contrast=[1.0, 1.0], clip=[-1e6, 1e6])
    fmap_size = (height // 4, width // 4)
    grid = official_region_grid(*fmap_size, 3)
    points = region_points(grid.corners, 3, fmap_size)
    original = sample_regions(image, points.expand(8, -1, -1, -1))
    generator = torch.Generator().manual_seed(0)
    (view1, theta1), (view2, theta2) = (transformed_view(image, config, generator) for _ in "ab")
    assert (theta1[:, 0, 0] < 0).any() and not torch.equal(theta1, theta2)  # flips, crops
    inside = []
    for view, theta in ((view1, theta1), (view2, theta2)):
        mapped = view_points(points, theta)
        valid = points_inside(mapped, fmap_size)
        regions = sample_regions(view, mapped)
        torch.testing.assert_close(regions[valid], original[valid], rtol=0, atol=1e-9)
        assert not torch.allclose(regions[~valid], original[~valid])  # the check can fail
        inside.append(valid)
    both = inside[0] & inside[1]
    assert both.any() and not both.all()


def test_an_encoder_of_position_only_is_above_chance_with_transformed_views():
    """The shortcut of aligned views: an embedding of where a region is in its view nearly
    solves the aligned loss, and is worse than chance once the views differ."""
    fmap_size, batch = (24, 24), 256  # many pairs: the mean over random transforms
    grid = official_region_grid(*fmap_size, 3)
    y, x = torch.meshgrid(*(torch.linspace(-1, 1, n) for n in fmap_size), indexing="ij")
    code = [torch.cos(math.pi * x), torch.sin(math.pi * x), torch.cos(math.pi * y)]
    position = torch.stack([*code, torch.sin(math.pi * y)])[None].repeat(2 * batch, 1, 1, 1)
    image_ids = torch.arange(batch).repeat(2)
    aligned = local_contrastive_loss(
        extract_regions(position, grid.corners, 3), image_ids, neg_index=grid.neg_index
    )
    assert float(aligned) < 0.01
    config = LocalAugmentConfig()
    generator = torch.Generator().manual_seed(0)
    theta = torch.cat(
        [sample_resized_crop(batch, config.view_crop_fraction, 0.5, generator) for _ in "ab"]
    )
    points = view_points(region_points(grid.corners, 3, fmap_size), theta)
    valid = points_inside(points, fmap_size)
    loss = local_contrastive_loss(
        sample_regions(position, points), image_ids, neg_index=grid.neg_index, valid=valid
    )
    chance = masked_local_chance_level(valid, image_ids, neg_index=grid.neg_index)
    assert float(loss) > float(chance) > 1.0


# ---------------------------------------------------------------------------------------------
# stage 2 end to end on the tiny phantom


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, tiny_config) -> Path:
    out = tmp_path_factory.mktemp("views")
    config = tiny_config(PretrainGlobalRun, "optim.iterations=2", "loss.volumes_per_batch=2")
    return run_pretrain_global(config, out / "global")


def _local(tiny_config, encoder_run: Path, out: Path, *overrides: str) -> Path:
    config = tiny_config(
        PretrainLocalRun,
        "optim.iterations=2",
        "optim.batch_size=4",
        "loss.volumes_per_batch=2",
        f"encoder={encoder_run}",
        *overrides,
    )
    return run_pretrain_local(config, out)


@pytest.mark.parametrize("strategy", ["LR", "LD"])
def test_transformed_views_train_end_to_end(tiny_config, encoder_run, tmp_path, strategy):
    run = _local(
        tiny_config, encoder_run, tmp_path, f"loss.strategy={strategy}", "loss.views=transformed"
    )
    rows = _metrics(run)
    assert [row["iteration"] for row in rows] == [1, 2]
    for row in rows:  # the chance level counts only the regions both views show
        assert 0 < row["chance"] < math.log(11) and math.isfinite(row["loss"])
    assert any(k.startswith("decoder.") for k in load_weights(run / "weights.safetensors"))


def test_batch_statistics_leave_the_encoder_tensors_of_stage_one(
    tiny_config, encoder_run, tmp_path
):
    frozen = _local(tiny_config, encoder_run, tmp_path / "frozen")
    batch = _local(tiny_config, encoder_run, tmp_path / "batch", "loss.encoder_bn=batch")
    stage1 = load_weights(encoder_run / "weights.safetensors")
    for run in (frozen, batch):
        weights = load_weights(run / "weights.safetensors")
        for key, value in stage1.items():
            if key.startswith("encoder."):  # weights and every BN buffer, counters included
                assert torch.equal(weights[key], value), key
    # the same batches and initial decoder, so only the encoder's normalisation differs
    assert _metrics(frozen)[0]["loss"] != _metrics(batch)[0]["loss"]


def test_official_1x1_lists_give_13_regions(tiny_config, encoder_run, tmp_path):
    official = ["loss.region_size=1", "loss.negatives=all", "model.g2_project=false"]
    run = _local(tiny_config, encoder_run, tmp_path / "k1", *official, "loss.k1_regions=official")
    assert _metrics(run)[0]["chance"] == pytest.approx(math.log(1 + 2 * 12))
    shared = _local(tiny_config, encoder_run, tmp_path / "shared", *official)
    assert _metrics(shared)[0]["chance"] == pytest.approx(math.log(1 + 2 * 16))


def test_view_keys_are_refused_with_aligned_views(tiny_config, encoder_run):
    with pytest.raises(InputError, match=r"augment.view_flip_prob.*loss.views=transformed"):
        tiny_config(PretrainLocalRun, f"encoder={encoder_run}", "augment.view_flip_prob=0.2")


# ---------------------------------------------------------------------------------------------
# the Cityscapes experiment (supplement 4) on generated images in its layout


def _write_cityscapes(root: Path, images: int = 8) -> Path:
    """RGB street-like images 128 x 256 (32 x 64 after the reader's /4) with road/sky ids."""
    rng = np.random.default_rng(0)
    for i in range(images):
        split, city = ("train", "aachen") if i < images - 2 else ("val", "frankfurt")
        stem = f"{city}_{i:06d}_000019"
        horizon = int(rng.integers(40, 90))
        ids = np.full((128, 256), 7, dtype=np.uint8)  # road
        ids[:horizon] = 23  # sky
        ids[horizon - 20 : horizon, 40:120] = 26  # a car
        rgb = np.zeros((128, 256, 3), dtype=np.uint8)
        for label_id, colour in ((7, (90, 90, 90)), (23, (120, 170, 230)), (26, (200, 30, 30))):
            rgb[ids == label_id] = colour
        rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
        save_cityscapes_frame(root, split, city, stem, rgb, ids)
    return root


def test_cityscapes_gr_lr_transformed_and_jittered_finetuning(tmp_path):
    root = _write_cityscapes(tmp_path / "cityscapes")
    common = [
        "data.dataset=cityscapes",
        f"data.root={root}",
        "data.size=[32,64]",
        "model.widths=[4,8,8,8,8,8]",
        "optim.iterations=1",
    ]
    stage1 = load_config(
        PretrainGlobalRun,
        None,
        [*common, "model.g1_hidden=16", "loss.strategy=GR", "loss.partitions=1"],
    )
    encoder = run_pretrain_global(stage1, tmp_path / "global")
    local = ["optim.batch_size=4", "loss.views=transformed", f"encoder={encoder}"]
    decoder = run_pretrain_local(
        load_config(PretrainLocalRun, None, [*common, *local]), tmp_path / "local"
    )
    finetune = [
        "finetune.init=encoder+decoder",
        f"finetune.pretrained={decoder}",
        "finetune.val_every=1",
        "optim.batch_size=2",
        "augment.geometry=crop",
        "augment.brightness=0.2",
        "augment.contrast=[0.6,1.4]",
        "augment.saturation=[0.6,1.4]",
        "augment.hue=0.1",
    ]
    run = run_finetune(load_config(FinetuneRun, None, [*common, *finetune]), tmp_path / "ft")
    assert math.isfinite(_metrics(run)[-1]["val_dice"])
