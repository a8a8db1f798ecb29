"""Segmentation losses against loop formulas, their limits and their errors."""

from __future__ import annotations

import math

import pytest
import torch

from contraseg.losses import (
    official_class_weights,
    segmentation_loss,
    soft_dice_loss,
    weighted_cross_entropy,
)


def dice_reference(logits: torch.Tensor, target: torch.Tensor, first_class: int) -> float:
    probs = torch.softmax(logits.double(), dim=1)
    scores = []
    for b in range(logits.shape[0]):
        for k in range(first_class, logits.shape[1]):
            p, y = probs[b, k], (target[b] == k).double()
            scores.append(float(2 * (p * y).sum() / (p.sum() + y.sum() + 1e-10)))
    return 1 - sum(scores) / len(scores)


def ce_reference(logits: torch.Tensor, target: torch.Tensor, weights: list[float]) -> float:
    log_probs = torch.log_softmax(logits.double(), dim=1)
    total, count = 0.0, 0
    for b in range(target.shape[0]):
        for h in range(target.shape[1]):
            for w in range(target.shape[2]):
                k = int(target[b, h, w])
                total += -weights[k] * float(log_probs[b, k, h, w])
                count += 1
    return total / count


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
