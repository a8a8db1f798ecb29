"""Preprocessing: parameters, normalisation, resample + crop/pad, and the inverse to native."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import volume_kit

from contraseg.config import DataConfig
from contraseg.data.preprocess import (
    GridInfo,
    PreprocessParams,
    labels_to_native,
    n4_correct,
    normalise,
    params_for,
    preprocess_volume,
    probabilities_to_native,
)
from contraseg.data.readers.acdc import AcdcReader, PhantomReader
from contraseg.data.volume import Volume
from contraseg.errors import InputError


def _volume(label: np.ndarray, spacing: tuple[float, float, float]) -> Volume:
    rng = np.random.default_rng(0)
    image = (label * 100.0 + rng.normal(20, 3, label.shape)).astype(np.float32)[..., None]
    return Volume("case", image, label, spacing, np.diag([*spacing, 1.0]), Path("case.nii.gz"))


def _dice(a: np.ndarray, b: np.ndarray, k: int) -> float:
    return 2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k))


def test_params_from_config_or_reader_defaults() -> None:
    reader = AcdcReader(DataConfig(dataset="acdc"))
    assert params_for(DataConfig(dataset="acdc"), reader) == PreprocessParams(
        (1.36719, 1.36719), (192, 192), False, (1.0, 99.0)
    )
    config = DataConfig(dataset="phantom", target_spacing=[2, 2.5], size=[64, 32], n4=True)
    params = params_for(config, PhantomReader(config))
    assert params == PreprocessParams((2.0, 2.5), (64, 32), True, (1.0, 99.0))


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("target_spacing", [1.0], "data.target_spacing"),
        ("target_spacing", [1.0, 0.0], "data.target_spacing"),
        ("size", [64, 0], "data.size"),
        ("percentiles", [99.0, 1.0], "data.percentiles"),
    ],
)
def test_bad_params_name_the_key(field: str, value: list, key: str) -> None:
    config = DataConfig(dataset="phantom", **{field: value})
    with pytest.raises(InputError) as info:
        params_for(config, PhantomReader(config))
    assert f"'{key}" in str(info.value)


def test_normalise_percentiles_without_clipping() -> None:
    rng = np.random.default_rng(1)
    image = rng.gamma(2.0, 50.0, (20, 20, 5, 2)).astype(np.float32)
    image[..., 1] *= 7
    out = normalise(image, (1.0, 99.0))
    for c in range(2):
        assert np.percentile(out[..., c], 1) == pytest.approx(0, abs=1e-5)
        assert np.percentile(out[..., c], 99) == pytest.approx(1, abs=1e-5)
    assert out.min() < 0 and out.max() > 1  # no clipping
    assert np.all(normalise(np.full((4, 4, 2, 1), 3.0, np.float32), (1, 99)) == 0)


def test_shapes_crop_and_pad() -> None:
    label = volume_kit.smooth_label((50, 70, 5))
    volume = _volume(label, (1.5, 1.0, 8.0))
    image, lab, grid = preprocess_volume(
        volume, PreprocessParams((1.0, 1.0), (60, 80), False, (1, 99))
    )
    assert image.shape == (5, 1, 60, 80) and image.dtype == np.float32
    assert lab is not None and lab.shape == (5, 60, 80) and lab.dtype == np.uint8
    assert grid.resampled_shape == (75, 70)
    assert grid.crop == (7, 0) and grid.pad == (0, 5)
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    assert np.all(image[:, :, :, :5] == 0)  # zero padding, before normalisation is irrelevant
    unlabelled = Volume("u", volume.image, None, volume.spacing, volume.affine, volume.source)
    assert (
        preprocess_volume(unlabelled, PreprocessParams((1.0, 1.0), (60, 80), False, (1, 99)))[1]
        is None
    )


def test_identity_grid_is_exact() -> None:
    label = volume_kit.smooth_label((40, 40, 4))
    _, lab, grid = preprocess_volume(
        _volume(label, (1.5, 1.5, 8.0)), PreprocessParams((1.5, 1.5), (40, 40), False, (1, 99))
    )
    np.testing.assert_array_equal(labels_to_native(lab, grid), label)


@pytest.mark.parametrize(
    ("native", "spacing", "size"),
    [
        ((96, 110, 6), (1.5, 1.5, 8.0), (112, 112)),  # upsampled to ACDC's 1.36719 mm, crop y
        ((170, 150, 4), (1.25, 1.3, 10.0), (176, 160)),  # downsampled, padded
    ],
)
def test_inverse_dice_on_native_grid(native: tuple, spacing: tuple, size: tuple) -> None:
    label = volume_kit.smooth_label(native)
    params = PreprocessParams((1.36719, 1.36719), size, False, (1, 99))
    _, lab, grid = preprocess_volume(_volume(label, spacing), params)
    assert grid.native_shape == native
    back = labels_to_native(lab, grid)
    probs = np.eye(4, dtype=np.float32)[lab].transpose(0, 3, 1, 2)  # one-hot (Z, K, H, W)
    soft = probabilities_to_native(probs, grid)
    assert soft.shape == (*native, 4) and soft.dtype == np.float32
    for result in (back, soft.argmax(-1)):
        assert result.shape == native
        for k in (1, 2, 3):
            assert _dice(result, label, k) >= 0.99


def test_probabilities_outside_the_window_are_background() -> None:
    grid = GridInfo(
        (20, 20, 2),
        (1.0, 1.0, 5.0),
        tuple(map(tuple, np.eye(4))),
        (20, 20),
        (5, 5),
        (0, 0),
        (10, 10),
    )
    probs = np.zeros((2, 3, 10, 10), np.float32)
    probs[:, 2] = 1.0  # class 2 everywhere inside the window
    native = probabilities_to_native(probs, grid).argmax(-1)
    assert np.all(native[5:15, 5:15] == 2)
    assert np.all(native[:5] == 0) and np.all(native[15:] == 0)
    with pytest.raises(ValueError, match="slices"):
        probabilities_to_native(probs[:1], grid)


def test_grid_info_json_round_trip() -> None:
    volume = _volume(volume_kit.smooth_label((33, 31, 3)), (1.4, 1.45, 7.0))
    _, _, grid = preprocess_volume(volume, PreprocessParams((1.0, 1.2), (32, 40), False, (1, 99)))
    assert GridInfo.from_json(json.loads(json.dumps(grid.to_json()))) == grid


def test_n4_on_a_tiny_volume() -> None:
    """N4 removes most of a smooth multiplicative bias; the pipeline runs with it on."""
    pytest.importorskip("SimpleITK")  # a dependency, absent from some GPU images (bench/gpu.sh)
    x, y, _ = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    r2 = (x - 16) ** 2 + (y - 16) ** 2
    tissue = np.where(r2 < 196, np.where(r2 < 36, 2.0, 1.0), 0.02)
    image = (100 * tissue * np.exp(0.6 * (x - 16) / 16)).astype(np.float32)
    body = tissue == 1.0
    fixed = n4_correct(image, (1.5, 1.5, 5.0))

    def cv(a: np.ndarray) -> float:
        return float(a[body].std() / a[body].mean())

    assert cv(fixed) < 0.5 * cv(image)
    volume = Volume("n4", image[..., None], None, (1.5, 1.5, 5.0), np.eye(4), Path("n4.nii.gz"))
    out, _, _ = preprocess_volume(volume, PreprocessParams((1.5, 1.5), (32, 32), True, (1, 99)))
    assert out.shape == (3, 1, 32, 32) and np.isfinite(out).all()
