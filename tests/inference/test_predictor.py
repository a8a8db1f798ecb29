"""The Segmenter: geometry on awkward grids, orientation, channels, ensembles, TTA, batching."""

from __future__ import annotations

import dataclasses
import warnings

import bundle_kit
import nibabel as nib
import numpy as np
import pytest
import torch

from contraseg import Segmenter as LazySegmenter
from contraseg.data.orientation import from_canonical, to_canonical
from contraseg.errors import InputError
from contraseg.inference import Segmenter, load_bundle, slice_probabilities
from contraseg.inference.predictor import TTA_FLIPS

GRIDS = {
    # name: (shape, voxel sizes, degrees of obliquity, codes)
    "axis_aligned_odd": ((37, 23, 5), (1.0, 1.0, 1.0), 0.0, (1, 1)),
    "rotated_90": ((30, 41, 3), (1.2, 0.8, 6.0), 90.0, (1, 0)),
    "oblique_anisotropic": ((33, 29, 7), (0.6, 1.4, 8.0), 23.0, (0, 2)),
    "no_codes": ((31, 31, 2), (2.0, 2.0, 2.0), 11.0, (0, 0)),
    "one_slice": ((45, 19, 1), (0.9, 0.9, 5.0), 40.0, (2, 1)),
}


@pytest.mark.parametrize("orientation", ["as_stored", "closest_canonical"])
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_label_map_overlays_the_input(tmp_path, grid, orientation):
    shape, spacing, degrees, codes = GRIDS[grid]
    model = bundle_kit.make_bundle(tmp_path / "model", orientation=orientation)
    source = bundle_kit.save(
        tmp_path / "in.nii.gz",
        bundle_kit.phantom_like(shape),
        bundle_kit.oblique_affine(spacing, degrees),
        *codes,
    )
    target = Segmenter.from_pretrained(model, device="cpu").predict_file(
        source, tmp_path / "out.nii.gz"
    )
    before, after = nib.load(source), nib.load(target)
    assert after.shape == before.shape
    assert after.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(after.affine, before.affine)
    for key in ("qform_code", "sform_code", "pixdim", "srow_x", "srow_y", "srow_z", "quatern_d"):
        np.testing.assert_array_equal(after.header[key], before.header[key])
    assert set(np.unique(np.asarray(after.dataobj))) <= {0, 1, 2, 3}


def test_multichannel_4d_input_gives_a_3d_label_map(tmp_path):
    model = bundle_kit.make_bundle(tmp_path / "model", in_channels=2)
    affine = bundle_kit.oblique_affine((0.7, 0.7, 3.0))
    image = np.stack(
        [bundle_kit.phantom_like((35, 27, 4)), bundle_kit.phantom_like((35, 27, 4), 1) ** 0.5], -1
    )
    source = bundle_kit.save(tmp_path / "in.nii.gz", image, affine)
    segmenter = Segmenter.from_pretrained(model, device="cpu")
    target = segmenter.predict_file(source, tmp_path / "out.nii.gz")
    after = nib.load(target)
    assert after.shape == (35, 27, 4)
    np.testing.assert_array_equal(after.affine, nib.load(source).affine)
    # the same channels as two nnU-Net channel files give the same labels
    for c in range(2):
        bundle_kit.save(tmp_path / f"case_{c:04d}.nii.gz", image[..., c], affine)
    pair = [tmp_path / "case_0000.nii.gz", tmp_path / "case_0001.nii.gz"]
    segmenter.predict_file(pair, tmp_path / "pair.nii.gz")
    np.testing.assert_array_equal(
        np.asarray(nib.load(tmp_path / "pair.nii.gz").dataobj), np.asarray(after.dataobj)
    )


def test_closest_canonical_predicts_on_the_canonical_grid_and_writes_back(tmp_path):
    """A reoriented model equals the as-stored model applied to the canonical volume, mapped
    back voxel by voxel: the inverse of the reorientation is exact."""
    folder = bundle_kit.make_bundle(tmp_path / "model", orientation="closest_canonical")
    bundle, network = load_bundle(folder)
    stored = dataclasses.replace(
        bundle, preprocessing=dataclasses.replace(bundle.preprocessing, orientation="as_stored")
    )
    image = bundle_kit.phantom_like((29, 8, 35))  # a coronal-like acquisition: few voxels along y
    affine = np.eye(4)
    affine[:3, :3] = bundle_kit.rotation(0, 80.0) @ np.diag([1.1, 4.0, 0.9])
    canonical, canonical_affine, spacing = to_canonical(image, affine, (1.1, 4.0, 0.9))
    assert canonical.shape != image.shape
    reoriented = Segmenter([network], [bundle], "cpu").predict(image, affine)
    direct = Segmenter([network], [stored], "cpu").predict(canonical, canonical_affine, spacing)
    np.testing.assert_array_equal(reoriented.labels, from_canonical(direct.labels, affine))
    assert reoriented.labels.shape == image.shape


def test_probabilities_and_labels_agree(tmp_path):
    model = bundle_kit.make_bundle(tmp_path / "model", label_values=(0, 205, 420, 850))
    segmenter = Segmenter.from_pretrained(model, device="cpu")
    image, affine = bundle_kit.phantom_like((30, 26, 3)), bundle_kit.oblique_affine((1.2, 1.2, 5.0))
    prediction = segmenter.predict(image, affine, return_probabilities=True)
    assert prediction.labels.dtype == np.uint16
    assert prediction.probabilities.shape == (4, 30, 26, 3)
    np.testing.assert_allclose(prediction.probabilities.sum(0), 1.0, atol=1e-5)
    values = np.asarray([0, 205, 420, 850])
    np.testing.assert_array_equal(prediction.labels, values[prediction.probabilities.argmax(0)])
    assert segmenter.predict(image, affine).probabilities is None


def test_a_2d_image_gives_a_2d_label_map(tmp_path):
    segmenter = Segmenter.from_pretrained(bundle_kit.make_bundle(tmp_path / "model"), device="cpu")
    image, affine = bundle_kit.phantom_like((40, 33)), bundle_kit.oblique_affine((0.5, 0.5, 1.0))
    prediction = segmenter.predict(image, affine, return_probabilities=True)
    assert prediction.labels.shape == (40, 33)
    assert prediction.probabilities.shape == (4, 40, 33)
    as_volume = segmenter.predict(image[:, :, None], affine)
    np.testing.assert_array_equal(as_volume.labels[:, :, 0], prediction.labels)


def test_ensemble_of_one_equals_the_model_and_of_two_averages(tmp_path):
    first = bundle_kit.make_bundle(tmp_path / "a", seed=1)
    second = bundle_kit.make_bundle(tmp_path / "b", seed=2, size=(64, 32), spacing=(2.0, 3.5))
    image, affine = bundle_kit.phantom_like((41, 30, 4)), bundle_kit.oblique_affine((1.0, 1.5, 4.0))
    alone = Segmenter.from_pretrained(first, "cpu").predict(image, affine, None, True)
    one = Segmenter.from_pretrained([first], "cpu").predict(image, affine, None, True)
    twice = Segmenter.from_pretrained([first, first], "cpu").predict(image, affine, None, True)
    np.testing.assert_array_equal(one.labels, alone.labels)
    np.testing.assert_array_equal(one.probabilities, alone.probabilities)
    np.testing.assert_array_equal(twice.labels, alone.labels)
    other = Segmenter.from_pretrained(second, "cpu").predict(image, affine, None, True)
    pair = Segmenter.from_pretrained([first, second], "cpu").predict(image, affine, None, True)
    mean = (alone.probabilities + other.probabilities) / 2
    np.testing.assert_allclose(pair.probabilities, mean, atol=1e-6)
    np.testing.assert_array_equal(pair.labels, mean.argmax(0))
    assert not np.array_equal(alone.labels, other.labels)  # the average is not trivial


def test_ensemble_with_large_label_values(tmp_path):
    values = (0, 205, 420, 850)
    models = [
        bundle_kit.make_bundle(tmp_path / f"m{i}", seed=i, label_values=values) for i in range(2)
    ]
    labels = (
        Segmenter.from_pretrained(models, "cpu")
        .predict(bundle_kit.phantom_like((25, 25, 2)), np.eye(4))
        .labels
    )
    assert labels.dtype == np.uint16 and set(np.unique(labels)) <= set(values)
    assert len(np.unique(labels)) > 1


def test_ensemble_members_must_share_classes(tmp_path):
    a = bundle_kit.make_bundle(tmp_path / "a")
    b = bundle_kit.make_bundle(tmp_path / "b", label_values=(0, 1, 2, 4))
    c = bundle_kit.make_bundle(tmp_path / "c", in_channels=2)
    with pytest.raises(InputError, match="share their classes"):
        Segmenter.from_pretrained([a, b], "cpu")
    with pytest.raises(InputError, match="same channels"):
        Segmenter.from_pretrained([a, c], "cpu")


def _flip_equivariant(network: torch.nn.Module) -> None:
    """Symmetric 3x3 kernels and 2x2 up-convolutions that only scale: with nearest upsampling,
    even-sized max-pooling and per-channel batch norm, the whole UNet then commutes with flips.
    (PyTorch's default initialisation, identity batch norm and a scaled last layer keep the
    outputs neither saturated nor constant.)"""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.reset_parameters()
            if isinstance(module, torch.nn.Conv2d):
                module.reset_parameters()
                w = module.weight
                if w.shape[-1] == 3:
                    w.copy_((w + w.flip(-1) + w.flip(-2) + w.flip(-1, -2)) / 4)
                else:
                    keep = w[..., :1, :1].clone()
                    w.zero_()
                    w[..., :1, :1] = keep
        network.head[-1].weight.mul_(1e4)


def test_tta_of_a_flip_equivariant_model_changes_nothing(tmp_path):
    bundle, network = load_bundle(bundle_kit.make_bundle(tmp_path / "model", seed=5))
    image, affine = bundle_kit.phantom_like((36, 28, 3)), bundle_kit.oblique_affine((1.3, 1.1, 4.0))
    plain = Segmenter([network], [bundle], "cpu").predict(image, affine, None, True)
    with_tta = Segmenter([network], [bundle], "cpu", tta=True).predict(image, affine, None, True)
    assert not np.allclose(plain.probabilities, with_tta.probabilities, atol=1e-3)

    _flip_equivariant(network)
    plain = Segmenter([network], [bundle], "cpu").predict(image, affine, None, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no autocast warning on a machine without CUDA
        with_tta = Segmenter([network], [bundle], "cpu", tta=True).predict(
            image, affine, None, True
        )
    np.testing.assert_allclose(with_tta.probabilities, plain.probabilities, atol=1e-5)
    np.testing.assert_array_equal(with_tta.labels, plain.labels)
    assert plain.probabilities[1].std() > 1e-3  # the outputs depend on the image


def test_tta_is_the_mean_over_flips_and_batching_changes_nothing(tmp_path):
    _, network = load_bundle(bundle_kit.make_bundle(tmp_path / "model", seed=3))
    slices = np.random.default_rng(0).normal(size=(5, 1, 32, 32)).astype(np.float32)
    cpu = torch.device("cpu")
    with torch.no_grad():
        x = torch.from_numpy(slices)
        expected = sum(
            torch.softmax(network(x.flip(d) if d else x), 1).flip(d) if d else
            torch.softmax(network(x), 1)
            for d in TTA_FLIPS
        ) / len(TTA_FLIPS)  # fmt: skip
    np.testing.assert_allclose(
        slice_probabilities(network, slices, cpu, batch_size=2, tta=True), expected, atol=1e-4
    )
    np.testing.assert_allclose(
        slice_probabilities(network, slices, cpu, batch_size=1),
        slice_probabilities(network, slices, cpu, batch_size=32),
        atol=1e-4,  # the convolution may pick another algorithm for another batch size
    )
    network.train()
    slice_probabilities(network, slices, cpu)
    assert network.training  # the mode is restored for fine-tuning's validation


def test_channel_of_a_4d_input(tmp_path):
    model = bundle_kit.make_bundle(tmp_path / "model", channel=1)
    segmenter = Segmenter.from_pretrained(model, "cpu")
    t2, adc = (
        bundle_kit.phantom_like((30, 30, 3)),
        bundle_kit.phantom_like((30, 30, 3), seed=9)[::-1].copy(),
    )
    both = np.stack([t2, adc], axis=-1)
    np.testing.assert_array_equal(
        segmenter.predict(both, np.eye(4)).labels, segmenter.predict(adc, np.eye(4)).labels
    )
    single = Segmenter.from_pretrained(bundle_kit.make_bundle(tmp_path / "single"), "cpu")
    with pytest.raises(InputError, match=r"has 2 channel\(s\); the model takes 1"):
        single.predict(both, np.eye(4))
    three = Segmenter.from_pretrained(bundle_kit.make_bundle(tmp_path / "c3", channel=3), "cpu")
    with pytest.raises(InputError, match="the model uses channel 3"):
        three.predict(both, np.eye(4))


def test_bad_arguments(tmp_path):
    segmenter = Segmenter.from_pretrained(bundle_kit.make_bundle(tmp_path / "model"), "cpu")
    with pytest.raises(InputError, match="got shape"):
        segmenter.predict(np.zeros((2, 2, 2, 1, 1)), np.eye(4))
    with pytest.raises(InputError, match="4 x 4"):
        segmenter.predict(np.zeros((8, 8, 2)), np.eye(3))
    with pytest.raises(InputError, match="spacing"):
        segmenter.predict(np.zeros((8, 8, 2)), np.eye(4), spacing=(1.0, 0.0, 1.0))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            Segmenter.from_pretrained(tmp_path / "model", device="cuda")
    with pytest.raises(InputError, match="batch_size"):
        Segmenter.from_pretrained(tmp_path / "model", "cpu", batch_size=0)


def test_the_package_exports_the_segmenter():
    assert LazySegmenter is Segmenter
