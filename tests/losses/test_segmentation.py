"""Segmentation losses against loop formulas, their limits and their errors."""

from __future__ import annotations

import math

import pytest
import torch

from contraseg.losses import (
    IGNORE_LABEL,
    SEGMENTATION_LOSSES,
    official_class_weights,
    one_hot,
    segmentation_loss,
    soft_dice_loss,
    split_ignored,
    weighted_cross_entropy,
)


def _expected(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, K, H, W) class probabilities of integer labels or of probabilities, in double."""
    if target.dtype.is_floating_point:
        return target.double()
    return torch.stack([(target == k).double() for k in range(num_classes)], dim=1)


def dice_reference(
    logits: torch.Tensor, target: torch.Tensor, first_class: int, keep: torch.Tensor | None = None
) -> float:
    probs = torch.softmax(logits.double(), dim=1)
    expected = _expected(target, logits.shape[1])
    keep = torch.ones(probs.shape[0], *probs.shape[2:]) if keep is None else keep.double()
    scores = []
    for b in range(logits.shape[0]):
        for k in range(first_class, logits.shape[1]):
            p, y = probs[b, k] * keep[b], expected[b, k] * keep[b]
            scores.append(float(2 * (p * y).sum() / (p.sum() + y.sum() + 1e-10)))
    return 1 - sum(scores) / len(scores)


def ce_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: list[float],
    keep: torch.Tensor | None = None,
) -> float:
    log_probs = torch.log_softmax(logits.double(), dim=1)
    expected = _expected(target, logits.shape[1])
    total, count = 0.0, 0
    batch, classes, height, width = logits.shape
    for b in range(batch):
        for h in range(height):
            for w in range(width):
                if keep is not None and not keep[b, h, w]:
                    continue
                for k in range(classes):
                    total += -weights[k] * float(expected[b, k, h, w] * log_probs[b, k, h, w])
                count += 1
    return total / max(count, 1)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 6, 5, generator=gen), torch.randint(0, 4, (3, 6, 5), generator=gen)


def test_dice_matches_loop_formula(batch):
    logits, target = batch
    assert float(soft_dice_loss(logits, target)) == pytest.approx(
        dice_reference(logits, target, 0), abs=1e-6
    )
    assert float(soft_dice_loss(logits, target, include_background=False)) == pytest.approx(
        dice_reference(logits, target, 1), abs=1e-6
    )


def test_weighted_ce_matches_loop_formula(batch):
    logits, target = batch
    weights = official_class_weights(4)
    got = float(weighted_cross_entropy(logits, target, weights))
    assert got == pytest.approx(ce_reference(logits, target, weights), abs=1e-6)
    plain = float(weighted_cross_entropy(logits, target))
    assert plain == pytest.approx(ce_reference(logits, target, [1.0] * 4), abs=1e-6)


def test_factory_dispatch(batch):
    logits, target = batch
    weights = official_class_weights(4)
    assert float(segmentation_loss("dice", 4)(logits, target)) == pytest.approx(
        float(soft_dice_loss(logits, target))
    )
    assert float(segmentation_loss("dice_fg", 4)(logits, target)) == pytest.approx(
        float(soft_dice_loss(logits, target, include_background=False))
    )
    assert float(segmentation_loss("ce", 4)(logits, target)) == pytest.approx(
        float(weighted_cross_entropy(logits, target, weights))
    )
    assert float(segmentation_loss("dice_ce", 4)(logits, target)) == pytest.approx(
        float(soft_dice_loss(logits, target) + weighted_cross_entropy(logits, target))
    )


def test_perfect_prediction_gives_zero_dice_and_ce():
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, 0, :3] = torch.tensor([0, 1, 2])  # every class present in every image
    logits = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 100
    assert float(soft_dice_loss(logits, target)) == pytest.approx(0.0, abs=1e-6)
    assert float(weighted_cross_entropy(logits, target)) == pytest.approx(0.0, abs=1e-6)


def test_official_class_weights():
    assert official_class_weights(4) == pytest.approx([0.1, 0.3, 0.3, 0.3])
    assert official_class_weights(3) == pytest.approx([0.1, 0.45, 0.45])
    assert official_class_weights(8) == pytest.approx([0.09] + [0.13] * 7)
    assert math.fsum(official_class_weights(6)) == pytest.approx(1.0)


def test_finite_gradients_under_bf16_autocast(batch):
    logits, target = batch
    logits = logits.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = segmentation_loss("dice_ce", 4)(logits.bfloat16(), target)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_errors_name_the_problem(batch):
    logits, target = batch
    with pytest.raises(ValueError, match="unknown segmentation loss"):
        segmentation_loss("focal", 4)
    with pytest.raises(ValueError, match="class weights for"):
        segmentation_loss("ce", 4, [0.5, 0.5])
    with pytest.raises(ValueError, match="labels must be in"):
        soft_dice_loss(logits, target + 4)
    with pytest.raises(ValueError, match="do not match"):
        soft_dice_loss(logits, target[:, :-1])
    with pytest.raises(ValueError, match=r"expected logits \(B, K, H, W\)"):
        soft_dice_loss(logits[0], target)
    with pytest.raises(ValueError, match="integer labels"):
        weighted_cross_entropy(logits, target.float())


@pytest.mark.parametrize("name", SEGMENTATION_LOSSES)
def test_one_hot_targets_give_the_integer_path(batch, name):
    logits, target = batch
    loss = segmentation_loss(name, 4)
    grads = []
    values = []
    for tgt in (target, one_hot(target, 4)):
        leaf = logits.clone().requires_grad_(True)
        value = loss(leaf, tgt)
        value.backward()
        values.append(value)
        grads.append(leaf.grad)
    torch.testing.assert_close(values[0], values[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_soft_targets_match_loop_formulas(batch):
    logits, _ = batch
    gen = torch.Generator().manual_seed(1)
    soft = torch.softmax(torch.randn(logits.shape, generator=gen), dim=1)
    weights = official_class_weights(4)
    assert float(soft_dice_loss(logits, soft)) == pytest.approx(
        dice_reference(logits, soft, 0), abs=1e-6
    )
    assert float(weighted_cross_entropy(logits, soft, weights)) == pytest.approx(
        ce_reference(logits, soft, weights), abs=1e-6
    )


@pytest.mark.parametrize("soft", [False, True])
def test_ignored_pixels_take_no_part(batch, soft):
    logits, target = batch
    ignore = torch.zeros(target.shape, dtype=torch.bool)
    ignore[0, :3] = True  # part of an image
    ignore[2] = True  # a whole image
    keep = ~ignore
    tgt = one_hot(target, 4) if soft else target
    weights = official_class_weights(4)
    assert float(soft_dice_loss(logits, tgt, ignore=ignore)) == pytest.approx(
        dice_reference(logits, target, 0, keep), abs=1e-6
    )
    assert float(weighted_cross_entropy(logits, tgt, weights, ignore)) == pytest.approx(
        ce_reference(logits, target, weights, keep), abs=1e-6
    )
    leaf = logits.clone().requires_grad_(True)
    segmentation_loss("dice_ce", 4)(leaf, tgt, ignore).backward()
    assert torch.all(leaf.grad.permute(0, 2, 3, 1)[ignore] == 0)
    assert torch.any(leaf.grad.permute(0, 2, 3, 1)[keep] != 0)


def test_everything_ignored_gives_a_finite_constant(batch):
    logits, target = batch
    ignore = torch.ones(target.shape, dtype=torch.bool)
    assert float(weighted_cross_entropy(logits, target, ignore=ignore)) == 0.0
    assert float(soft_dice_loss(logits, target, ignore=ignore)) == pytest.approx(1.0)


def test_split_ignored_marks_the_ignore_label():
    labels = torch.tensor([[[0, 3, IGNORE_LABEL], [IGNORE_LABEL, 1, 2]]])
    cleaned, ignore = split_ignored(labels)
    assert ignore.tolist() == [[[False, False, True], [True, False, False]]]
    assert cleaned.tolist() == [[[0, 3, 0], [0, 1, 2]]]


def test_errors_of_soft_targets_and_ignore_masks(batch):
    logits, target = batch
    with pytest.raises(ValueError, match="3 class channels, logits 4"):
        soft_dice_loss(logits, one_hot(target, 4)[:, :3])
    with pytest.raises(ValueError, match="ignore must be a bool"):
        weighted_cross_entropy(logits, target, ignore=torch.zeros(target.shape))
    with pytest.raises(ValueError, match="ignore must be a bool"):
        soft_dice_loss(logits, target, ignore=torch.zeros(target.shape[1:], dtype=torch.bool))
