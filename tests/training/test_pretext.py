"""Pretext-task baselines: the corruptions are what they claim, and their weights fine-tune."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contraseg.config import FinetuneRun, PretrainPretextRun
from contraseg.data.pretext import (
    box_mask,
    inpaint,
    patch_side,
    rotation_batch,
    sample_boxes,
    sample_swaps,
    swap_patches,
)
from contraseg.errors import InputError
from contraseg.training.checkpoint import load_weights
from contraseg.training.pretext import run_pretrain_pretext
from contraseg.training.stages import Finetuner


def test_rotation_labels_count_quarter_turns():
    images = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    rotated, labels = rotation_batch(images)
    assert rotated.shape == (12, 2, 5, 5)
    for row in range(12):
        k, i = int(labels[row]), row % 3
        assert k == row // 3
        expected = np.rot90(images[i].numpy(), k, axes=(1, 2))
        np.testing.assert_array_equal(rotated[row].numpy(), expected)
    # a quarter turn takes the top-right pixel to the top-left (counter-clockwise)
    marker = torch.zeros(1, 1, 4, 4)
    marker[0, 0, 0, 3] = 1
    turned, _ = rotation_batch(marker)
    assert turned[1, 0, 0, 0] == 1 and turned[2, 0, 3, 0] == 1 and turned[3, 0, 3, 3] == 1
    with pytest.raises(ValueError, match="square"):
        rotation_batch(torch.zeros(1, 1, 4, 6))


def test_inpainting_boxes_lie_in_the_image_within_the_size_range():
    generator = torch.Generator().manual_seed(0)
    boxes = sample_boxes(200, (40, 60), 2, (0.2, 0.5), generator)
    top, left, height, width = boxes.unbind(-1)
    assert top.min() >= 0 and left.min() >= 0
    assert (top + height).max() <= 40 and (left + width).max() <= 60
    assert height.min() >= 8 and height.max() <= 20 and width.min() >= 12 and width.max() <= 30
    assert top.max() > 15 and left.max() > 25  # positions are spread, not pinned to a corner


def test_inpainting_zeroes_exactly_the_boxes():
    boxes = sample_boxes(4, (16, 20), 3, (0.1, 0.4), torch.Generator().manual_seed(1))
    mask = box_mask(boxes, (16, 20))
    drawn = torch.zeros(4, 16, 20, dtype=torch.bool)
    for b in range(4):
        for top, left, height, width in boxes[b].tolist():
            drawn[b, top : top + height, left : left + width] = True
    assert torch.equal(mask, drawn)
    images = torch.rand(4, 2, 16, 20) + 0.1
    corrupted = inpaint(images, mask)
    inside = mask[:, None].expand_as(images)
    assert torch.all(corrupted[inside] == 0)
    assert torch.equal(corrupted[~inside], images[~inside])


def test_swapped_patches_are_disjoint_exchanged_and_nothing_else_moves():
    size, swaps, patch = (24, 30), 6, patch_side((24, 30), 0.1)
    assert patch == 2
    corners = sample_swaps(5, size, swaps, patch, torch.Generator().manual_seed(2))
    images = torch.randn(5, 2, *size)
    swapped = swap_patches(images, corners, patch)
    for b in range(5):
        covered = torch.zeros(size, dtype=torch.int64)
        for (r1, c1), (r2, c2) in corners[b].tolist():
            first = (slice(None), slice(r1, r1 + patch), slice(c1, c1 + patch))
            second = (slice(None), slice(r2, r2 + patch), slice(c2, c2 + patch))
            assert torch.equal(swapped[b][first], images[b][second])
            assert torch.equal(swapped[b][second], images[b][first])
            covered[first[1:]] += 1
            covered[second[1:]] += 1
        assert covered.max() == 1  # the 2 * swaps patches are disjoint and inside the image
        assert int(covered.sum()) == 2 * swaps * patch * patch
        untouched = covered == 0
        assert torch.equal(swapped[b][:, untouched], images[b][:, untouched])
    assert torch.equal(swap_patches(swapped, corners, patch), images)  # a permutation
    with pytest.raises(ValueError, match="disjoint"):
        sample_swaps(1, (8, 8), 9, 2, torch.Generator())


@pytest.fixture(scope="module")
def pretext_runs(tmp_path_factory, tiny_config):
    out = tmp_path_factory.mktemp("pretext")
    runs = {}
    for task, extra in (
        ("rotation", ()),
        ("inpainting", ("pretext.decoder_blocks=3",)),
        ("context_restoration", ()),
    ):
        config = tiny_config(
            PretrainPretextRun,
            "optim.iterations=2",
            "optim.batch_size=3",
            f"pretext.task={task}",
            *extra,
        )
        runs[task] = run_pretrain_pretext(config, out / task)
    return runs


@pytest.mark.parametrize(
    ("task", "blocks"),
    [("rotation", set()), ("inpainting", {0, 1, 2}), ("context_restoration", {0, 1, 2, 3, 4})],
)
def test_each_pretext_run_writes_its_parts(pretext_runs, task, blocks):
    weights = load_weights(pretext_runs[task] / "weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"encoder", "pretext_head"} | (
        {"decoder"} if blocks else set()
    )
    assert {int(k.split(".")[1]) for k in weights if k.startswith("decoder.")} == blocks
    rows = (pretext_runs[task] / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2


@pytest.mark.parametrize(
    ("task", "init"),
    [
        ("rotation", "encoder"),
        ("inpainting", "encoder+decoder"),
        ("context_restoration", "encoder+decoder"),
        ("context_restoration", "encoder"),
    ],
)
def test_finetune_takes_the_pretext_weights(pretext_runs, assert_finetune_takes, task, init):
    assert_finetune_takes(pretext_runs[task], init)


def test_rotation_weights_have_no_decoder_for_encoder_plus_decoder(
    pretext_runs, tiny_config, tmp_path
):
    config = tiny_config(
        FinetuneRun,
        "finetune.init=encoder+decoder",
        f"finetune.pretrained={pretext_runs['rotation']}",
    )
    with pytest.raises(InputError, match="holds no decoder blocks"):
        Finetuner(config, tmp_path / "ft").setup()


def test_rotation_refuses_non_square_slices(tiny_config, tmp_path):
    config = tiny_config(PretrainPretextRun, "data.size=[32,64]", "optim.iterations=1")
    with pytest.raises(InputError, match="square"):
        run_pretrain_pretext(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
