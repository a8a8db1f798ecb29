"""Normalisation inside the foreground (data.normalise_mask) and the unusual-intensity warning."""

from __future__ import annotations

import numpy as np
import pytest
import volume_kit

from contraseg.data.preprocess import (
    IntensityProfile,
    foreground_mask,
    normalise,
    otsu_threshold,
    unusual_intensity,
)


def _head(seed: int, stripped: bool) -> np.ndarray:
    """(X, Y, Z, 1): a brain ellipsoid inside a skull shell; noise everywhere unless the scan
    is skull-stripped (then everything outside the brain is exactly 0)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (48, 48, 12)), indexing="ij")
    r = np.sqrt(x**2 + y**2 + (z / 1.2) ** 2)
    image = np.where(r < 0.6, rng.normal(300, 30, r.shape), 0.0)
    if not stripped:
        image += np.where((r > 0.7) & (r < 0.85), rng.normal(900, 50, r.shape), 0.0)
        image += np.abs(rng.normal(0, 20, r.shape))
    return image[..., None].astype(np.float32)


def test_masked_normalisation_ignores_what_lies_outside_the_foreground() -> None:
    volume = _head(0, stripped=True)
    framed = volume.copy()
    framed[0], framed[-1], framed[:, 0], framed[:, -1] = 5000.0, 5000.0, 5000.0, 5000.0
    mask, framed_mask = foreground_mask(volume, "nonzero"), foreground_mask(framed, "nonzero")
    assert np.array_equal(mask, framed_mask)  # the frame is not the largest region
    a = normalise(volume, (1.0, 99.0), mask)
    b = normalise(framed, (1.0, 99.0), framed_mask)
    assert np.array_equal(a[mask], b[mask]) and not np.any(b[~mask])
    unmasked = normalise(framed, (1.0, 99.0))
    assert not np.allclose(unmasked[mask], a[mask])  # without the mask the frame shifts p99


def test_otsu_separates_two_intensity_populations() -> None:
    values = np.concatenate([np.full(500, 10.0), np.full(300, 200.0)])
    assert 10.0 < otsu_threshold(values) <= 200.0
    image = np.where(np.arange(64) < 40, 10.0, 200.0)[:, None, None, None] * np.ones((64, 4, 3, 1))
    assert foreground_mask(image, "otsu")[:, 0, 0].tolist() == [False] * 40 + [True] * 24
    assert foreground_mask(image, "none") is None


def test_an_empty_foreground_falls_back_to_the_whole_volume() -> None:
    assert foreground_mask(np.zeros((4, 4, 2, 1), np.float32), "nonzero").all()


def test_the_warning_fires_for_skull_on_against_skull_stripped_and_not_for_alike_cases() -> None:
    stripped = [IntensityProfile.of(_head(seed, stripped=True)) for seed in (1, 2)]
    skull_on = IntensityProfile.of(_head(3, stripped=False))
    message = unusual_intensity(skull_on, stripped[:1])
    assert message is not None and "foreground fraction" in message and "\n" not in message
    assert unusual_intensity(stripped[1], stripped[:1]) is None
    assert unusual_intensity(IntensityProfile.of(_head(4, stripped=False)), [skull_on]) is None
    assert unusual_intensity(skull_on, []) is None


@pytest.mark.parametrize("mode", ["none", "nonzero", "otsu"])
def test_prepare_warns_once_in_one_line_about_the_unusual_case(tmp_path, capsys, mode) -> None:
    from contraseg.cli import main

    root = tmp_path / "Dataset001_Head"
    for folder in ("imagesTr", "labelsTr", "imagesUnlabelled"):
        (root / folder).mkdir(parents=True)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    for i in range(2):
        image = _head(i, stripped=True)[..., 0]
        volume_kit.save_nifti(root / "imagesTr" / f"case_{i}_0000.nii.gz", image, affine)
        label = (image > 0).astype(np.uint8)
        volume_kit.save_nifti(root / "labelsTr" / f"case_{i}.nii.gz", label, affine)
    skull_on = _head(5, stripped=False)[..., 0]
    volume_kit.save_nifti(root / "imagesUnlabelled" / "new_0000.nii.gz", skull_on, affine)
    (root / "dataset.json").write_text(
        '{"channel_names": {"0": "T1"}, "labels": {"background": 0, "brain": 1}, '
        '"numTraining": 2, "file_ending": ".nii.gz"}'
    )
    args = ["prepare", "--dataset", "nnunet", "--root", str(root), f"data.normalise_mask={mode}"]
    assert main(args) == 0
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("contraseg: WARNING: ")
    assert "new_0000.nii.gz" in warnings[0] and "normalise_mask" in warnings[0]
    assert main(args) == 0  # the cache is reused: nothing to say again
    assert capsys.readouterr().err == ""
