"""Batch augmentations: geometry conventions, image/label alignment, per-image randomness."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from contraseg.config import FinetuneAugmentConfig, LocalAugmentConfig, PretrainAugmentConfig
from contraseg.data.augment import (
    VIEW_PARAMS,
    adjust_hue,
    adjust_intensity,
    adjust_saturation,
    apply_finetune,
    apply_view,
    colour_jitter,
    finetune_augment,
    jitter_enabled,
    pretrain_view,
    sample_affine,
    sample_colour_jitter,
    sample_crop,
    sample_elastic_field,
    sample_finetune,
    sample_intensity,
    sample_resized_crop,
    sample_view,
    transformed_view,
    warp,
    warp_labels,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _disks(batch: int, height: int, width: int, num_classes: int = 4) -> torch.Tensor:
    """(B, H, W) long: nested off-centre disks, so every transform moves some boundary."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    labels = torch.zeros(batch, height, width, dtype=torch.long)
    for b in range(batch):
        cy, cx = height * (0.4 + 0.03 * (b % 4)), width * 0.55
        radius = torch.sqrt((y - cy) ** 2 + ((x - cx) * 0.8) ** 2)
        for k in range(1, num_classes):
            labels[b][radius < min(height, width) * (0.45 - 0.1 * k)] = k
    return labels


def _to_pixels(theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Normalised (B, 2, 3) theta -> its linear part in pixel units."""
    height, width = size
    half = torch.tensor([width / 2.0, height / 2.0], dtype=theta.dtype)
    return theta[:, :, :2] * half[None, :, None] / half[None, None, :]


# ---------------------------------------------------------------------------------------------
# warp conventions


def test_warp_flip_and_quarter_turn_are_exact() -> None:
    labels = _disks(2, 12, 12)
    images = torch.rand(2, 3, 12, 12)
    flip = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(2, 2, 3)
    quarter = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]).expand(2, 2, 3)
    assert torch.equal(warp_labels(labels, flip), labels.flip(-1))
    torch.testing.assert_close(warp(images, flip), images.flip(-1))
    turned = warp_labels(labels, quarter)
    assert torch.equal(turned, torch.rot90(labels, 1, dims=(1, 2)))
    torch.testing.assert_close(warp(images, quarter), torch.rot90(images, 1, dims=(2, 3)))


def test_warp_field_is_in_pixels() -> None:
    """A constant field of (+2, -1) pixels shifts the content by (-2, +1) pixels."""
    images = torch.rand(1, 1, 10, 14)
    field = torch.tensor([2.0, -1.0]).expand(1, 10, 14, 2)
    out = warp(images, torch.eye(2, 3)[None], field)
    torch.testing.assert_close(out[0, 0, 1:, :-2], images[0, 0, :-1, 2:])


# ---------------------------------------------------------------------------------------------
# fine-tuning augmentation


def test_sample_affine_is_rigid_in_pixels_and_covers_the_options() -> None:
    config = FinetuneAugmentConfig()
    size = (24, 40)
    theta = sample_affine(2000, size, config, _gen())
    assert theta.shape == (2000, 2, 3) and theta.dtype == torch.float64
    assert torch.all(theta[:, :, 2] == 0)  # about the image centre
    linear = _to_pixels(theta, size)
    gram = linear @ linear.transpose(1, 2)
    zoom2 = gram[:, 0, 0]
    torch.testing.assert_close(gram, zoom2[:, None, None] * torch.eye(2, dtype=torch.float64))
    assert zoom2.min() >= 1 / 1.05**2 - 1e-9 and zoom2.max() <= 1 / 0.95**2 + 1e-9
    # classify each draw; each of the 5 options has probability 1/5
    zoomed = (zoom2 - 1).abs() > 1e-9
    flipped = torch.linalg.det(linear) < 0
    angle = torch.rad2deg(torch.atan2(linear[:, 1, 0], linear[:, 1, 1]))  # of R in R @ mirror
    quarter_eighths = torch.isclose(angle / 45, (angle / 45).round(), atol=1e-9, rtol=0)
    turned = (angle.abs() > 1e-9) & ~flipped & ~zoomed
    identity = ~zoomed & ~flipped & ~turned
    assert 0.17 < zoomed.float().mean() < 0.23
    assert 0.07 < flipped.float().mean() < 0.13  # flip option x flip_prob 0.5
    assert 0.17 < (turned & ~quarter_eighths).float().mean() < 0.23  # small rotations
    assert (turned & ~quarter_eighths).logical_and(angle.abs() > 15).sum() == 0
    assert 0.15 < (turned & quarter_eighths).float().mean() < 0.20  # k * 45, k in 1..7
    assert 0.29 < identity.float().mean() < 0.36  # none, unflipped flips, k = 0


def test_sample_affine_respects_zero_ranges() -> None:
    config = FinetuneAugmentConfig(rotation_deg=0.0, scale=[1.0, 1.0], flip_prob=0.0, rot45=False)
    theta = sample_affine(64, (16, 16), config, _gen())
    torch.testing.assert_close(theta, torch.eye(2, 3, dtype=torch.float64).expand(64, 2, 3))


def test_elastic_field_probability_and_scale() -> None:
    config = FinetuneAugmentConfig(elastic_sigma_px=5.0, elastic_prob=0.5)
    field = sample_elastic_field(800, (20, 30), config, _gen())
    assert field.shape == (800, 20, 30, 2)
    deformed = field.abs().amax(dim=(1, 2, 3)) > 0
    assert 0.44 < deformed.float().mean() < 0.56
    corners = field[deformed][:, [0, 0, -1, -1], [0, -1, 0, -1]]  # the control points
    assert 4.6 < corners.std().item() < 5.4
    never = dataclasses.replace(config, elastic_prob=0.0)
    assert torch.count_nonzero(sample_elastic_field(8, (20, 30), never, _gen())) == 0


def test_finetune_augment_is_warp_with_the_sampled_parameters() -> None:
    """The returned label is exactly the label warped by the parameters the seed produces."""
    config = FinetuneAugmentConfig(elastic_prob=1.0)
    labels = _disks(6, 32, 40)
    images = torch.rand(6, 2, 32, 40)
    out_images, out_labels = finetune_augment(images, labels, config, _gen(3))
    generator = _gen(3)
    theta = sample_affine(6, (32, 40), config, generator)
    field = sample_elastic_field(6, (32, 40), config, generator)
    assert torch.equal(out_labels, warp_labels(labels, theta, field))
    assert torch.equal(out_images, warp(images, theta, field))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finetune_augment_keeps_image_and_label_aligned(seed: int) -> None:
    """A one-hot label sent through the image path agrees with the label path."""
    labels = _disks(8, 48, 48)
    one_hot = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    config = FinetuneAugmentConfig(elastic_prob=0.5)
    warped_one_hot, warped_labels = finetune_augment(one_hot, labels, config, _gen(seed))
    agree = (warped_one_hot.argmax(1) == warped_labels).float().mean()
    assert agree > 0.97
    assert not torch.equal(warped_labels, labels)  # something actually moved
    # the check can fail: the same images with another seed's labels disagree far more
    _, other = finetune_augment(one_hot, labels, config, _gen(seed + 100))
    assert (warped_one_hot.argmax(1) == other).float().mean() < agree - 0.02


def test_finetune_augment_reproducible_and_per_image() -> None:
    config = FinetuneAugmentConfig()
    labels = _disks(1, 32, 32).expand(16, 32, 32)
    images = labels[:, None].float() / 3
    first = finetune_augment(images, labels, config, _gen(7))
    second = finetune_augment(images, labels, config, _gen(7))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    distinct = {tuple(label.flatten().tolist()) for label in first[1]}
    assert len(distinct) > 8  # identical inputs, different transforms per image


def test_finetune_augment_disabled_is_identity() -> None:
    images, labels = torch.rand(2, 1, 8, 8), _disks(2, 8, 8)
    out = finetune_augment(images, labels, FinetuneAugmentConfig(enabled=False), _gen())
    assert out[0] is images and out[1] is labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_finetune_augment_shapes_and_dtypes(dtype: torch.dtype) -> None:
    labels = _disks(3, 20, 28)
    images = (labels[:, None].float() / 3).to(dtype)
    out_images, out_labels = finetune_augment(images, labels, FinetuneAugmentConfig(), _gen())
    assert out_images.shape == images.shape and out_images.dtype == dtype
    assert out_labels.shape == labels.shape and out_labels.dtype == torch.long
    assert out_labels.min() >= 0 and out_labels.max() <= 3


def test_finetune_augment_rejects_mismatched_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        finetune_augment(torch.rand(2, 1, 8, 8), _disks(2, 8, 9), FinetuneAugmentConfig(), _gen())


def test_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    labels = _disks(4, 32, 32)
    images = labels[:, None].float() / 3
    config = FinetuneAugmentConfig(elastic_prob=1.0)
    cpu = finetune_augment(images, labels, config, _gen(5))
    gpu = finetune_augment(images.cuda(), labels.cuda(), config, _gen(5))
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-4, rtol=0)
    assert (gpu[1].cpu() == cpu[1]).float().mean() > 0.999
    pre = PretrainAugmentConfig()
    torch.testing.assert_close(
        pretrain_view(images.cuda(), pre, _gen(5)).cpu(), pretrain_view(images, pre, _gen(5))
    )


# ---------------------------------------------------------------------------------------------
# pre-training views


def test_sample_crop_stays_inside_the_image() -> None:
    config = PretrainAugmentConfig(crop_fraction=[0.5, 0.6])
    size = (30, 50)
    theta = sample_crop(1000, size, config, _gen())
    sx, sy = theta[:, 0, 0], theta[:, 1, 1]
    torch.testing.assert_close(sx * size[1], sy * size[0])  # square in pixels
    side = sx * size[1] / min(size)
    assert side.min() >= 0.5 and side.max() <= 0.6
    assert torch.all(theta[:, 0, 2].abs() + sx <= 1) and torch.all(theta[:, 1, 2].abs() + sy <= 1)
    assert theta[:, 0, 2].std() > 0.2  # positions spread over the free range
    with pytest.raises(ValueError, match="crop_fraction"):
        sample_crop(1, size, PretrainAugmentConfig(crop_fraction=[0.5, 1.2]), _gen())


def test_pretrain_crop_resizes_a_ramp_linearly() -> None:
    """Cropping x -> x is a ramp again, with slope side/W, inside the original range."""
    config = PretrainAugmentConfig(brightness=0.0, contrast=[1.0, 1.0], clip=[-1e9, 1e9])
    width = 40
    ramp = torch.arange(width, dtype=torch.float64).expand(6, 1, 24, width).clone()
    out = pretrain_view(ramp, config, _gen())
    theta = sample_crop(6, (24, width), config, _gen())
    slope = out[:, 0, :, 1:] - out[:, 0, :, :-1]
    torch.testing.assert_close(slope, theta[:, 0, 0, None, None].expand_as(slope).clone())
    assert out.min() >= 0 and out.max() <= width - 1


def test_pretrain_crop_never_samples_outside_the_image() -> None:
    """Crops touching the edge reach up to half a pixel past the last centre: no dark rim."""
    config = PretrainAugmentConfig(
        crop_fraction=[0.8, 0.9], brightness=0.0, contrast=[1.0, 1.0], clip=[0.0, 2.0]
    )
    out = pretrain_view(torch.ones(300, 1, 12, 12), config, _gen())
    torch.testing.assert_close(out, torch.ones_like(out))


def test_pretrain_view_intensity_only_is_per_image() -> None:
    config = PretrainAugmentConfig()
    images = torch.full((16, 1, 8, 8), 0.5)
    images[:, :, :4] = 0.7
    out = pretrain_view(images, config, _gen(1), crop=False)
    brightness, contrast = sample_intensity(16, config, _gen(1))
    torch.testing.assert_close(out, adjust_intensity(images, brightness, contrast, config.clip))
    assert len(set(brightness.tolist())) == 16 and len(set(contrast.tolist())) == 16
    # contrast keeps the mean (where nothing clips) and scales the spread
    mean = out.mean(dim=(1, 2, 3))
    torch.testing.assert_close(mean, (0.6 + brightness).clamp(0.0, 1.5).float())
    spread = out[:, 0, 0, 0] - out[:, 0, -1, 0]
    torch.testing.assert_close(spread, (0.2 * contrast).float(), atol=1e-6, rtol=0)


def test_pretrain_view_clips_and_keeps_dtype() -> None:
    config = PretrainAugmentConfig(brightness=2.0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        images = torch.rand(4, 1, 16, 16).to(dtype)
        out = pretrain_view(images, config, _gen())
        assert out.shape == images.shape and out.dtype == dtype
        assert out.min() >= 0.0 and out.max() <= 1.5


def test_pretrain_view_reproducible_and_per_image() -> None:
    images = torch.rand(1, 1, 24, 24).expand(8, 1, 24, 24)
    config = PretrainAugmentConfig()
    first = pretrain_view(images, config, _gen(9))
    assert torch.equal(first, pretrain_view(images, config, _gen(9)))
    assert not torch.equal(first, pretrain_view(images, config, _gen(10)))
    pairs = [(i, j) for i in range(8) for j in range(i + 1, 8)]
    assert all(not torch.allclose(first[i], first[j]) for i, j in pairs)


def test_cuda_generator_is_refused() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with pytest.raises(ValueError, match="CPU generator"):
        sample_intensity(2, PretrainAugmentConfig(), torch.Generator(device="cuda"))


# ---------------------------------------------------------------------------------------------
# views of the local loss with loss.views=transformed


def test_resized_crop_keeps_the_aspect_inside_the_image_and_flips() -> None:
    theta = sample_resized_crop(4000, [0.6, 0.9], 0.3, _gen(1))
    side = theta[:, 1, 1]
    assert ((side >= 0.6) & (side <= 0.9)).all()
    assert torch.equal(theta[:, 0, 0].abs(), side)  # the same fraction of both sides
    assert (theta[:, :, 2].abs() + side[:, None] <= 1 + 1e-12).all()  # fully inside
    assert (theta[:, 0, 1] == 0).all() and (theta[:, 1, 0] == 0).all()
    assert (theta[:, 0, 0] < 0).double().mean() == pytest.approx(0.3, abs=0.03)


def test_transformed_view_returns_the_transform_it_applied() -> None:
    images = torch.rand(5, 2, 24, 40)
    config = LocalAugmentConfig()
    view, theta = transformed_view(images, config, _gen(4))
    generator = _gen(4)
    assert torch.equal(theta, sample_resized_crop(5, [0.6, 1.0], 0.5, generator))
    brightness, contrast = sample_intensity(5, config, generator)
    want = adjust_intensity(warp(images, theta, padding="border"), brightness, contrast, [0, 1.5])
    assert torch.equal(view, want)


# ---------------------------------------------------------------------------------------------
# colour jitter (Cityscapes fine-tuning, supplement 4)


def test_hue_third_turn_permutes_the_channels_and_a_full_turn_is_identity() -> None:
    images = torch.rand(3, 3, 8, 10, dtype=torch.float64) * 1.4 - 0.2  # beyond [0, 1] too
    third = adjust_hue(images, torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(third, images[:, [2, 0, 1]])
    for turns in (0.0, 1.0, -1.0):
        shifted = adjust_hue(images, torch.full((3,), turns, dtype=torch.float64))
        torch.testing.assert_close(shifted, images)
    small = adjust_hue(images, torch.tensor([0.1, -0.05, 0.2], dtype=torch.float64))
    torch.testing.assert_close(small.amax(1), images.amax(1))  # value and chroma are kept
    torch.testing.assert_close(small.amin(1), images.amin(1))
    assert not torch.allclose(small, images)


def test_saturation_zero_is_the_grey_image_and_one_is_identity() -> None:
    images = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    grey = adjust_saturation(images, torch.zeros(2, dtype=torch.float64))
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    for channel in range(3):
        torch.testing.assert_close(grey[:, channel], luma)
    torch.testing.assert_close(
        adjust_saturation(images, torch.ones(2, dtype=torch.float64)), images
    )


def test_colour_jitter_on_grey_and_other_channel_counts() -> None:
    params = [torch.tensor([0.1]), torch.tensor([1.2]), torch.tensor([0.5]), torch.tensor([0.2])]
    grey = torch.rand(1, 1, 5, 5)
    want = adjust_intensity(grey, params[0], params[1], (-1e9, 1e9))
    torch.testing.assert_close(colour_jitter(grey, *params), want)  # no saturation or hue
    with pytest.raises(ValueError, match="RGB"):
        colour_jitter(torch.rand(1, 2, 5, 5), *params)


JITTER = {"brightness": 0.2, "contrast": [0.6, 1.4], "saturation": [0.6, 1.4], "hue": 0.1}


def test_finetune_crop_and_jitter_keep_labels_aligned_and_are_per_image() -> None:
    labels = _disks(8, 32, 64)
    one_hot = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    config = FinetuneAugmentConfig(geometry="crop", crop_fraction=[0.5, 0.8])
    warped, warped_labels = finetune_augment(one_hot, labels, config, _gen(2))
    assert (warped.argmax(1) == warped_labels).float().mean() > 0.97
    assert not torch.equal(warped_labels, labels)
    generator = _gen(2)
    theta = sample_resized_crop(8, [0.5, 0.8], 0.0, generator)
    assert torch.equal(warped_labels, warp_labels(labels, theta))
    images = torch.rand(1, 3, 32, 64).expand(8, 3, 32, 64)
    jittered = dataclasses.replace(config, **JITTER)
    out, out_labels = finetune_augment(images, labels, jittered, _gen(2))
    assert torch.equal(out_labels, warped_labels)  # jitter draws after the crop, images only
    generator = _gen(2)
    theta = sample_resized_crop(8, [0.5, 0.8], 0.0, generator)
    cropped = warp(images, theta, padding="border")
    want = colour_jitter(cropped, *sample_colour_jitter(8, jittered, generator))
    torch.testing.assert_close(out, want)
    assert not torch.allclose(out, cropped)


def test_jitter_off_draws_nothing() -> None:
    """The default (medical) fine-tuning draws exactly what it drew before jitter existed."""
    labels = _disks(4, 16, 16)
    images = torch.rand(4, 3, 16, 16)
    generator = _gen(5)
    finetune_augment(images, labels, FinetuneAugmentConfig(), generator)
    reference = _gen(5)
    sample_affine(4, (16, 16), FinetuneAugmentConfig(), reference)
    sample_elastic_field(4, (16, 16), FinetuneAugmentConfig(), reference)
    assert torch.equal(generator.get_state(), reference.get_state())


def test_pretrain_view_with_colour_jitter_and_aspect_crops() -> None:
    """Cityscapes views: aspect-keeping crops, then the four jitter steps, then the clip."""
    images = torch.rand(4, 3, 16, 32) * 1.2
    config = PretrainAugmentConfig(crop_shape="aspect", saturation=[0.5, 1.5], hue=0.2)
    view = pretrain_view(images, config, _gen(6))
    generator = _gen(6)
    cropped = warp(images, sample_resized_crop(4, [0.5, 0.6], 0.0, generator), padding="border")
    jittered = colour_jitter(cropped, *sample_colour_jitter(4, config, generator))
    torch.testing.assert_close(view, jittered.clamp(0.0, 1.5))
    # brightness and contrast are drawn first either way: a grey image sees just those two
    grey = images[:, :1]
    plain = pretrain_view(grey, PretrainAugmentConfig(), _gen(6), crop=False)
    coloured = dataclasses.replace(PretrainAugmentConfig(), saturation=[0.5, 1.5], hue=0.2)
    torch.testing.assert_close(pretrain_view(grey, coloured, _gen(6), crop=False), plain)


# ---------------------------------------------------------------------------------------------
# parameters drawn on the host, applied on the device (what a compiled step does)


def test_view_rows_hold_the_parameters_pretrain_view_draws() -> None:
    """A row per image: the crop's theta (the identity without a crop), then brightness,
    contrast, saturation 1 and hue 0 when only the first two are jittered."""
    config = PretrainAugmentConfig()
    rows = sample_view(5, (24, 32), config, _gen(7))
    generator = _gen(7)
    theta = sample_crop(5, (24, 32), config, generator)
    brightness, contrast = sample_intensity(5, config, generator)
    assert rows.shape == (5, VIEW_PARAMS) and rows.dtype == torch.float64
    assert torch.equal(rows[:, :6], theta.reshape(5, 6))
    assert torch.equal(rows[:, 6:8], torch.stack([brightness, contrast], dim=1))
    assert torch.equal(rows[:, 8:], torch.tensor([[1.0, 0.0]] * 5, dtype=torch.float64))
    plain = sample_view(5, (24, 32), config, _gen(7), crop=False)
    assert torch.equal(
        plain[:, :6], torch.eye(2, 3, dtype=torch.float64).reshape(1, 6).expand(5, 6)
    )


@pytest.mark.parametrize(
    "config",
    [LocalAugmentConfig(), LocalAugmentConfig(crop_shape="aspect", saturation=[0.5, 1.5])],
)
def test_views_made_in_one_call_equal_views_made_one_by_one(config) -> None:
    """What the pre-training stages do: both views' rows drawn in turn, copied at once and
    applied to the batch twice over in one call, bit for bit the views drawn one by one."""
    images = torch.rand(4, 3, 16, 24)
    generator = _gen(8)
    one_by_one = torch.cat([pretrain_view(images, config, generator) for _ in range(2)])
    assert torch.equal(pretrain_view(images, config, _gen(8), views=2), one_by_one)
    generator = _gen(9)
    first, second = (transformed_view(images, config, generator) for _ in range(2))
    views, theta = transformed_view(images, config, _gen(9), views=2)
    assert torch.equal(views, torch.cat([first[0], second[0]]))
    assert torch.equal(theta, torch.cat([first[1], second[1]]))
    assert theta.dtype == torch.float64 and theta.device.type == "cpu"  # for view_points


@pytest.mark.parametrize(
    "config",
    [
        FinetuneAugmentConfig(elastic_prob=1.0),
        FinetuneAugmentConfig(geometry="crop", brightness=0.2, saturation=[0.5, 1.5], hue=0.1),
    ],
)
def test_finetune_rows_hold_theta_then_the_jitter(config) -> None:
    """One row per image: theta, then the four jitter parameters when any is set; the elastic
    field (affine geometry only) is drawn between the two."""
    generator = _gen(9)
    rows, field = sample_finetune(6, (20, 28), config, generator)
    reference = _gen(9)
    if config.geometry == "crop":
        theta = sample_resized_crop(6, config.crop_fraction, 0.0, reference)
        assert field is None
    else:
        theta = sample_affine(6, (20, 28), config, reference)
        assert torch.equal(field, sample_elastic_field(6, (20, 28), config, reference))
    assert torch.equal(rows[:, :6], theta.reshape(6, 6))
    if jitter_enabled(config):
        jitter = torch.stack(sample_colour_jitter(6, config, reference), dim=1)
        assert torch.equal(rows[:, 6:], jitter)
    assert rows.shape[1] == (10 if jitter_enabled(config) else 6)
    assert torch.equal(generator.get_state(), reference.get_state())


def test_compiled_appliers_trace_whole_and_give_what_eager_gives() -> None:
    """The trainer passes the appliers compiled (``apply``): nothing in them reads a value, so
    each traces into one graph, and the result is the eager one."""
    whole = functools.partial(torch.compile, backend="aot_eager", fullgraph=True)
    images, labels = torch.rand(4, 1, 16, 16), _disks(4, 16, 16)
    config = PretrainAugmentConfig()
    torch._dynamo.reset()
    eager = pretrain_view(images, config, _gen(10), views=2)
    assert torch.equal(
        pretrain_view(images, config, _gen(10), views=2, apply=whole(apply_view)), eager
    )
    finetune = FinetuneAugmentConfig(elastic_prob=1.0)
    eager = finetune_augment(images, labels, finetune, _gen(11))
    traced = finetune_augment(images, labels, finetune, _gen(11), whole(apply_finetune))
    assert torch.equal(traced[0], eager[0]) and torch.equal(traced[1], eager[1])
