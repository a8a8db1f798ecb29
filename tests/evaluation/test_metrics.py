"""Dice and HD95 against MONAI, the spacing, and the empty-mask policy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, compute_hausdorff_distance

from contraseg.evaluation.metrics import dice_per_class, hd95_per_class, summarise_hd95


def _one_hot(volume: np.ndarray, num_classes: int) -> torch.Tensor:
    """(X, Y, Z) labels -> (1, K, X, Y, Z) one-hot, the layout MONAI's metrics take."""
    return torch.nn.functional.one_hot(torch.from_numpy(volume), num_classes).permute(3, 0, 1, 2)[
        None
    ]


def _blobs(rng: np.random.Generator, shape: tuple[int, int, int], num_classes: int) -> np.ndarray:
    """Labels with every class present: random boxes painted over a background."""
    volume = np.zeros(shape, dtype=np.int64)
    for label in range(1, num_classes):
        lo = [rng.integers(0, n // 2) for n in shape]
        hi = [a + rng.integers(2, n // 2) for a, n in zip(lo, shape, strict=True)]
        volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = label
    return volume


@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_equals_monai(num_classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = _blobs(rng, (20, 18, 9), num_classes)
    noisy = rng.random(ref.shape) < 0.2
    pred = np.where(noisy, rng.integers(0, num_classes, ref.shape), ref)
    metric = DiceMetric(include_background=False, reduction="none")
    expected = metric(_one_hot(pred, num_classes), _one_hot(ref, num_classes))[0].numpy()
    np.testing.assert_allclose(dice_per_class(pred, ref, num_classes), expected, rtol=1e-6)


def test_dice_empty_policy() -> None:
    ref = np.zeros((6, 6, 6), dtype=np.int64)
    pred = ref.copy()
    ref[1:3, 1:3, 1:3] = 1  # class 1: only in the reference
    pred[4:, 4:, 4:] = 2  # class 2: only in the prediction; class 3: in neither
    np.testing.assert_array_equal(dice_per_class(pred, ref, 4), [0.0, 0.0, 1.0])


def test_dice_rejects_bad_input() -> None:
    vol = np.zeros((4, 4, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="shape"):
        dice_per_class(vol, vol[:3], 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        dice_per_class(vol + 2, vol, 2)
    with pytest.raises(ValueError, match="integer"):
        dice_per_class(vol.astype(np.float32), vol, 2)


def test_hd95_single_voxels_anisotropic_spacing() -> None:
    """Spacing is per array axis: the same 2-voxel offset costs 2 x that axis's spacing."""
    spacing = (0.5, 1.0, 3.0)
    for axis, mm in enumerate(spacing):
        ref = np.zeros((8, 8, 8), dtype=np.int64)
        pred = ref.copy()
        ref[3, 3, 3] = 1
        offset = [3, 3, 3]
        offset[axis] += 2
        pred[tuple(offset)] = 1
        assert hd95_per_class(pred, ref, spacing, 2)[0] == pytest.approx(2 * mm)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI-internal
@pytest.mark.parametrize("seed", [0, 1])
def test_hd95_doubles_with_spacing_and_matches_monai(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = _blobs(rng, (16, 14, 10), 3)
    pred = np.roll(ref, shift=(1, -2, 1), axis=(0, 1, 2))
    spacing = (0.8, 1.25, 2.5)
    hd = hd95_per_class(pred, ref, spacing, 3)
    expected = compute_hausdorff_distance(
        _one_hot(pred, 3), _one_hot(ref, 3), percentile=95, spacing=list(spacing)
    )[0].numpy()
    np.testing.assert_allclose(hd, expected, rtol=1e-6)
    assert np.all(hd > 0)
    doubled = hd95_per_class(pred, ref, tuple(2 * s for s in spacing), 3)
    np.testing.assert_allclose(doubled, 2 * hd, rtol=1e-5)


def test_hd95_empty_policy_without_warnings() -> None:
    ref = np.zeros((6, 6, 6), dtype=np.int64)
    pred = ref.copy()
    ref[1:3, 1:3, 1:3] = 1  # class 1: only in the reference
    pred[4:, 4:, 4:] = 2  # class 2: only in the prediction; class 3: in neither
    ref[0, 5, 0] = pred[0, 5, 0] = 4  # class 4: identical
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hd = hd95_per_class(pred, ref, (1.0, 1.0, 1.0), 5)
    np.testing.assert_array_equal(hd, [np.nan, np.nan, 0.0, 0.0])


def test_hd95_rejects_bad_spacing() -> None:
    vol = np.zeros((4, 4, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="spacing"):
        hd95_per_class(vol, vol, (1.0, 1.0), 2)
    with pytest.raises(ValueError, match="spacing"):
        hd95_per_class(vol, vol, (1.0, 0.0, 1.0), 2)


def test_summarise_hd95_is_nan_aware_and_counts_undefined() -> None:
    values = np.array([[1.0, np.nan], [3.0, 5.0], [np.nan, np.nan]])
    summary = summarise_hd95(values)
    assert summary.mean == pytest.approx((1.0 + 4.0) / 2)  # per volume, then over volumes
    np.testing.assert_allclose(summary.per_class, [2.0, 5.0])
    assert summary.undefined == 3
    np.testing.assert_array_equal(summary.undefined_per_class, [1, 2])
    assert np.isnan(summarise_hd95(np.full((2, 2), np.nan)).mean)
