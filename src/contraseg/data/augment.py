"""Batch augmentations as torch ops on the batch's device (docs/augmentation.md).

Every random parameter is drawn per image on the CPU from the caller's ``torch.Generator`` and
only then moved to the batch's device, so a seed gives the same augmentation on CPU and GPU and
the GPU never waits on per-image CPU work. The samplers are public so tests (and users) can see
exactly which transform was applied. Each augmentation is a sampler of all its parameters as one
row per image (:func:`sample_view`, :func:`sample_transformed_view`, :func:`sample_finetune`)
and a pure function that applies them (:func:`apply_view`, :func:`apply_finetune`): the trainer
copies a batch's parameters to the device in one transfer and compiles the appliers with the
network (docs/training.md, "Speed and several GPUs").

Geometry follows ``torch.nn.functional.affine_grid``/``grid_sample`` with
``align_corners=False``: ``theta`` (B, 2, 3) maps normalised output coordinates (x, y in
[-1, 1], the image edges) to normalised input coordinates. Rotations and scalings are built in
pixel units and then normalised, so they stay rigid on non-square images. Pixels rotated or
scaled in from outside the image are 0 (background for labels).

Differences from the official code (docs/augmentation.md): brightness/contrast values are drawn
per image, not one per batch; fine-tuning has no intensity augmentation by default, as the
official code in practice has none; labels are warped with nearest-neighbour sampling,
not as bilinearly warped one-hot maps; the affine and the elastic field are applied in one
resampling. Beyond the official code: views for the local loss that are cropped and flipped
differently, with their transform returned (:func:`transformed_view`, docs/local-views.md),
and the random crop and colour jitter of the supplement's Cityscapes experiment
(``geometry: crop`` and the jitter options of :func:`finetune_augment`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from contraseg.config import FinetuneAugmentConfig, LocalAugmentConfig, PretrainAugmentConfig
from contraseg.devices import to_device

__all__ = [
    "VIEW_PARAMS",
    "adjust_hue",
    "adjust_intensity",
    "adjust_saturation",
    "apply_finetune",
    "apply_view",
    "colour_enabled",
    "colour_jitter",
    "finetune_augment",
    "jitter_enabled",
    "pretrain_view",
    "sample_affine",
    "sample_colour_jitter",
    "sample_crop",
    "sample_elastic_field",
    "sample_finetune",
    "sample_intensity",
    "sample_resized_crop",
    "sample_transformed_view",
    "sample_view",
    "transformed_view",
    "view_theta",
    "warp",
    "warp_labels",
]

# Options of the per-image geometric transform (docs/augmentation.md); ROT45 only if config.rot45.
ROTATE, SCALE, FLIP, ROT45, NONE = range(5)
# A row of a view's parameters: its sampling theta (2 x 3, row-major), then brightness,
# contrast, saturation and hue (see sample_view).
THETA = 6
VIEW_PARAMS = THETA + 4


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws of U(low, high) in float64 on the CPU."""
    _check_cpu(generator)
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _check_cpu(generator: torch.Generator) -> None:
    # Parameters must come from a CPU generator so that a seed means the same thing everywhere.
    if generator.device.type != "cpu":
        raise ValueError(f"augmentation parameters need a CPU generator, got {generator.device}")


def _pixel_to_theta(matrix: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 2, 2) linear maps in pixel units about the centre -> (B, 2, 3) normalised ``theta``."""
    height, width = size
    half = torch.tensor([width / 2.0, height / 2.0], dtype=matrix.dtype)
    linear = matrix * half[None, None, :] / half[None, :, None]  # S^-1 A S, S = diag(W/2, H/2)
    return torch.cat([linear, torch.zeros(matrix.shape[0], 2, 1, dtype=matrix.dtype)], dim=2)


# ---------------------------------------------------------------------------------------------
# Parameter samplers (CPU, float64)


def sample_crop(
    batch: int, size: tuple[int, int], config: PretrainAugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """``theta`` (B, 2, 3) of a square crop, side U(crop_fraction) * min(H, W), inside the image.

    Sampling the output grid through this ``theta`` resizes the crop to the full (H, W).
    """
    height, width = size
    low, high = config.crop_fraction
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"crop_fraction must satisfy 0 < low <= high <= 1, got {[low, high]}")
    side = _uniform(batch, low, high, generator) * min(height, width)
    sx, sy = side / width, side / height  # half-extent of the crop in normalised units
    tx = _uniform(batch, -1.0, 1.0, generator) * (1.0 - sx)
    ty = _uniform(batch, -1.0, 1.0, generator) * (1.0 - sy)
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = sx, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    return theta


def sample_resized_crop(
    batch: int, fraction: list[float], flip_prob: float, generator: torch.Generator
) -> torch.Tensor:
    """``theta`` (B, 2, 3) of a crop whose sides are U(fraction) x the image's sides (the aspect
    ratio is kept), placed uniformly inside the image, mirrored left-right with probability
    ``flip_prob``. Sampling the output grid through it resizes the crop to the full (H, W).
    """
    low, high = fraction
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"crop fraction must satisfy 0 < low <= high <= 1, got {[low, high]}")
    side = _uniform(batch, low, high, generator)
    tx = _uniform(batch, -1.0, 1.0, generator) * (1.0 - side)
    ty = _uniform(batch, -1.0, 1.0, generator) * (1.0 - side)
    mirror = torch.where(_uniform(batch, 0.0, 1.0, generator) < flip_prob, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = side * mirror, tx
    theta[:, 1, 1], theta[:, 1, 2] = side, ty
    return theta


def sample_intensity(
    batch: int, config: PretrainAugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image brightness offsets U(-b, b) and contrast factors U(contrast), each (B,)."""
    brightness = _uniform(batch, -config.brightness, config.brightness, generator)
    contrast = _uniform(batch, *config.contrast, generator)
    return brightness, contrast


def jitter_enabled(config: FinetuneAugmentConfig) -> bool:
    """Whether any colour-jitter option of ``config`` is away from its no-op value."""
    return bool(
        config.brightness > 0
        or list(config.contrast) != [1.0, 1.0]
        or list(config.saturation) != [1.0, 1.0]
        or config.hue > 0
    )


def sample_colour_jitter(
    batch: int,
    config: FinetuneAugmentConfig | PretrainAugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image brightness offsets U(-b, b), contrast and saturation factors U(range) and hue
    shifts U(-h, h) in turns, each (B,); the first two drawn as :func:`sample_intensity`."""
    brightness = _uniform(batch, -config.brightness, config.brightness, generator)
    contrast = _uniform(batch, *config.contrast, generator)
    saturation = _uniform(batch, *config.saturation, generator)
    hue = _uniform(batch, -config.hue, config.hue, generator)
    return brightness, contrast, saturation, hue


def sample_affine(
    batch: int, size: tuple[int, int], config: FinetuneAugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """``theta`` (B, 2, 3): per image one of the options below, chosen with equal probability.

    Options: rotation U(-rotation_deg, rotation_deg); scale U(scale) (above 1 zooms in);
    left-right flip with probability flip_prob; rotation by k * 45 degrees, k in 0..7 (only if
    rot45); none. All parameters are drawn for every image whatever its option, so the random
    stream, and hence every other image's transform, does not depend on the choices.
    """
    options = [ROTATE, SCALE, FLIP, *([ROT45] if config.rot45 else []), NONE]
    _check_cpu(generator)
    choice = torch.tensor(options)[torch.randint(len(options), (batch,), generator=generator)]
    small = _uniform(batch, -config.rotation_deg, config.rotation_deg, generator)
    scale = _uniform(batch, *config.scale, generator)
    flip = _uniform(batch, 0.0, 1.0, generator) < config.flip_prob
    k = torch.randint(8, (batch,), generator=generator).to(torch.float64)

    degrees = torch.where(choice == ROTATE, small, torch.where(choice == ROT45, 45.0 * k, 0.0))
    zoom = torch.where(choice == SCALE, scale, 1.0)
    mirror = torch.where((choice == FLIP) & flip, -1.0, 1.0)
    radians = torch.deg2rad(degrees)
    cos, sin = torch.cos(radians), torch.sin(radians)
    # input = R(angle) @ diag(mirror, 1) @ output / zoom, in pixel units about the image centre
    matrix = (
        torch.stack(
            [torch.stack([cos * mirror, -sin], -1), torch.stack([sin * mirror, cos], -1)], dim=1
        )
        / zoom[:, None, None]
    )
    return _pixel_to_theta(matrix, size)


def sample_elastic_field(
    batch: int,
    size: tuple[int, int],
    config: FinetuneAugmentConfig,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Displacements (B, H, W, 2) in pixels, (x, y) last, zero for images left undeformed.

    Each image is deformed with probability elastic_prob: an elastic_grid x elastic_grid grid of
    N(0, elastic_sigma_px) displacements per axis, upsampled bicubically on ``device`` (the
    corner control points sit on the corner pixels).
    """
    _check_cpu(generator)
    grid = config.elastic_grid
    deform = _uniform(batch, 0.0, 1.0, generator) < config.elastic_prob
    coarse = torch.randn(batch, 2, grid, grid, generator=generator, dtype=torch.float64)
    coarse = coarse * config.elastic_sigma_px * deform[:, None, None, None]
    dense = F.interpolate(
        to_device(coarse, device, torch.float32), size=size, mode="bicubic", align_corners=True
    )
    return dense.permute(0, 2, 3, 1)


def colour_enabled(config: PretrainAugmentConfig) -> bool:
    """Whether a view's saturation or hue is jittered, besides brightness and contrast."""
    return list(config.saturation) != [1.0, 1.0] or config.hue != 0


def _view_row(
    theta: torch.Tensor, config: PretrainAugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """(B, VIEW_PARAMS): ``theta`` then the colour parameters, drawn after it; saturation 1 and
    hue 0 (no random draw) unless :func:`colour_enabled`."""
    batch = theta.shape[0]
    if colour_enabled(config):
        colour = sample_colour_jitter(batch, config, generator)
    else:
        brightness, contrast = sample_intensity(batch, config, generator)
        colour = (brightness, contrast, torch.ones_like(contrast), torch.zeros_like(contrast))
    return torch.cat([theta.reshape(batch, THETA), torch.stack(colour, dim=1)], dim=1)


def sample_view(
    batch: int,
    size: tuple[int, int],
    config: PretrainAugmentConfig,
    generator: torch.Generator,
    crop: bool = True,
) -> torch.Tensor:
    """The parameters of :func:`pretrain_view` for ``batch`` images of ``size``: (B,
    VIEW_PARAMS) float64 on the CPU, one row per image (the crop's theta, the identity without
    ``crop``; brightness, contrast, saturation, hue)."""
    if not crop:
        theta = torch.eye(2, 3, dtype=torch.float64).expand(batch, 2, 3)
    elif config.crop_shape == "square":
        theta = sample_crop(batch, size, config, generator)
    else:
        theta = sample_resized_crop(batch, config.crop_fraction, 0.0, generator)
    return _view_row(theta, config, generator)


def sample_transformed_view(
    batch: int, config: LocalAugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """The parameters of :func:`transformed_view`, as :func:`sample_view`'s rows: a crop of
    U(view_crop_fraction) x each side, mirrored with probability view_flip_prob."""
    theta = sample_resized_crop(batch, config.view_crop_fraction, config.view_flip_prob, generator)
    return _view_row(theta, config, generator)


def view_theta(params: torch.Tensor) -> torch.Tensor:
    """The sampling theta (B, 2, 3) of a view's parameter rows."""
    return params[:, :THETA].reshape(-1, 2, 3)


def sample_finetune(
    batch: int,
    size: tuple[int, int],
    config: FinetuneAugmentConfig,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The parameters of :func:`finetune_augment`: rows (B, 6 or 10) float64 on the CPU, one per
    image, with theta (:func:`sample_resized_crop` for ``geometry: crop``, else
    :func:`sample_affine`) and then the four jitter parameters if :func:`jitter_enabled` (none
    drawn otherwise); and for ``geometry: affine`` the elastic field on ``device``
    (:func:`sample_elastic_field`, drawn between the two), else None.

    The field is upsampled here, not in :func:`apply_finetune`: compiled, the bicubic
    upsampling is decomposed and rounds differently from PyTorch's kernel (by about 2e-5
    pixels), and a traced run would no longer train bit for bit as the eager one on the CPU
    (``test_compiled_networks_train_as_the_eager_ones``).
    """
    field = None
    if config.geometry == "crop":
        theta = sample_resized_crop(batch, config.crop_fraction, 0.0, generator)
    else:
        theta = sample_affine(batch, size, config, generator)
        field = sample_elastic_field(batch, size, config, generator, device)
    parts = [theta.reshape(batch, THETA)]
    if jitter_enabled(config):
        parts.append(torch.stack(sample_colour_jitter(batch, config, generator), dim=1))
    return torch.cat(parts, dim=1), field


# ---------------------------------------------------------------------------------------------
# Appliers (on the batch's device)


def warp(
    images: torch.Tensor,
    theta: torch.Tensor,
    field: torch.Tensor | None = None,
    mode: Literal["bilinear", "nearest"] = "bilinear",
    padding: Literal["zeros", "border"] = "zeros",
) -> torch.Tensor:
    """Resample (B, C, H, W) at ``theta`` applied to (pixel centre + ``field``), in one pass.

    ``field`` (B, H, W, 2) is a displacement in pixels applied before ``theta``, i.e. the output
    is ``image(theta(p + field(p)))``: the elastic deformation of the affinely warped image. One
    resampling instead of two keeps images sharp and labels exact. Sampling runs in float32
    (float64 for float64 images) because a bfloat16 grid is off by pixels on 200-pixel images;
    the result has the input's dtype. ``padding`` is what lies outside the image: "zeros"
    (background) for rotations and scalings, "border" for crops, which lie inside the image but
    whose outermost samples fall up to half a pixel beyond the outermost pixel centres.
    """
    batch, _, height, width = images.shape
    work = torch.float64 if images.dtype == torch.float64 else torch.float32
    theta = to_device(theta, images.device, work)
    identity = torch.eye(2, 3, dtype=work, device=images.device).expand(batch, 2, 3)
    points = F.affine_grid(identity, [batch, 1, height, width], align_corners=False)
    if field is not None:
        to_normalised = to_device(
            torch.tensor([2.0 / width, 2.0 / height], dtype=work), images.device, work
        )
        points = points + to_device(field, images.device, work) * to_normalised
    grid = torch.einsum("bhwj,bij->bhwi", points, theta[:, :, :2]) + theta[:, None, None, :, 2]
    out = F.grid_sample(images.to(work), grid, mode=mode, padding_mode=padding, align_corners=False)
    return out.to(images.dtype)


def warp_labels(
    labels: torch.Tensor, theta: torch.Tensor, field: torch.Tensor | None = None
) -> torch.Tensor:
    """Integer label maps (B, H, W) through :func:`warp` with nearest sampling; same dtype."""
    warped = warp(labels[:, None].to(torch.float32), theta, field, mode="nearest")
    return warped[:, 0].round().to(labels.dtype)


def adjust_intensity(
    images: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    clip: tuple[float, float] | list[float],
) -> torch.Tensor:
    """Add ``brightness``, scale by ``contrast`` about each image's per-channel mean, clip.

    The order (brightness, contrast, clip) and the per-channel mean are those of
    ``tf.image.random_brightness``/``random_contrast`` used by the official code.
    """
    brightness, contrast = _per_image(brightness, images), _per_image(contrast, images)
    shifted = images + brightness
    mean = shifted.mean(dim=(2, 3), keepdim=True)
    return ((shifted - mean) * contrast + mean).clamp(clip[0], clip[1])


# ITU-R BT.601 luma weights, the grey image of saturation adjustments (as torchvision)
_LUMA = (0.299, 0.587, 0.114)


def _per_image(values: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return to_device(values, images.device, images.dtype).view(-1, 1, 1, 1)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend RGB images (B, 3, H, W) with their grey image: ``grey + factor * (x - grey)``.

    Linear, so it is defined for intensities outside [0, 1] (normalised images have them).
    """
    luma = to_device(torch.tensor(_LUMA), images.device, images.dtype).view(1, 3, 1, 1)
    grey = (images * luma).sum(dim=1, keepdim=True)
    return grey + _per_image(factor, images) * (images - grey)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images (B, 3, H, W) by ``shift`` turns on the HSV hexcone.

    Each pixel keeps its largest and smallest channel (HSV value and chroma); only the hue
    moves, as ``tf.image.adjust_hue``. Written without HSV's division by the value so that it
    holds for any intensities; a third of a turn maps (R, G, B) to (B, R, G) exactly.
    """
    red, green, blue = images.unbind(dim=1)
    high, which = images.max(dim=1)
    chroma = high - images.min(dim=1).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    sextant = torch.where(
        which == 0,
        torch.remainder((green - blue) / safe, 6.0),
        torch.where(which == 1, (blue - red) / safe + 2.0, (red - green) / safe + 4.0),
    )
    sextant = torch.remainder(sextant + 6.0 * _per_image(shift, images)[:, 0], 6.0)
    offsets = to_device(torch.tensor([5.0, 3.0, 1.0]), images.device, images.dtype)
    k = torch.remainder(offsets.view(1, 3, 1, 1) + sextant[:, None], 6.0)
    return high[:, None] - chroma[:, None] * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def colour_jitter(
    images: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor,
) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, in the supplement's order, per image; no clip.

    Brightness and contrast as :func:`adjust_intensity` (offset, then a factor about each
    channel's mean, as ``tf.image``); saturation and hue need RGB: a grey image (one channel)
    has neither and is returned after the first two, any other channel count is a ValueError.
    """
    images = adjust_intensity(images, brightness, contrast, (-math.inf, math.inf))
    channels = images.shape[1]
    if channels == 1:
        return images
    if channels != 3:
        raise ValueError(f"saturation and hue need RGB images (3 channels), got {channels}")
    return adjust_hue(adjust_saturation(images, saturation), hue)


def apply_view(
    images: torch.Tensor,
    params: torch.Tensor,
    clip: tuple[float, float] | list[float],
    crop: bool = True,
    colour: bool = False,
) -> torch.Tensor:
    """The views of (B, C, H, W) ``images`` for parameter rows ``params`` (B, VIEW_PARAMS) of
    :func:`sample_view`, on the images' device.

    With ``crop``, the crop resized back to (H, W) (bilinear); then per-image brightness and
    contrast, or with ``colour`` (:func:`colour_enabled`) all four steps of
    :func:`colour_jitter`, and the clip. Reads no value, so it compiles into one graph.
    """
    if crop:
        images = warp(images, view_theta(params), padding="border")
    brightness, contrast, saturation, hue = params[:, THETA:].unbind(dim=1)
    if not colour:
        return adjust_intensity(images, brightness, contrast, clip)
    jittered = colour_jitter(images, brightness, contrast, saturation, hue)
    return jittered.clamp(clip[0], clip[1])


def pretrain_view(
    images: torch.Tensor,
    config: PretrainAugmentConfig,
    generator: torch.Generator,
    crop: bool = True,
    views: int = 1,
    apply: Callable[..., torch.Tensor] = apply_view,
) -> torch.Tensor:
    """An augmented view (B, C, H, W) for contrastive pre-training (docs/augmentation.md).

    Random crop resized back to (H, W) (bilinear): a square of the shorter side (official) or,
    with ``crop_shape: aspect``, the image's shape (:func:`sample_resized_crop`). Then per-image
    brightness/contrast, saturation/hue if set (RGB, :func:`colour_jitter`), and clipping.
    ``crop=False`` applies the intensity part only, for the local loss, whose two views must
    stay in pixel correspondence.

    :func:`sample_view` then :func:`apply_view` (or ``apply``, the trainer's compiled one).
    ``views`` > 1 stacks that many views (``views`` x B), drawn one after another and made in
    one copy of their parameters to the device and one call: the same as stacking single views.
    """
    rows = [
        sample_view(len(images), images.shape[-2:], config, generator, crop) for _ in range(views)
    ]
    return _apply_views(images, rows, config, crop, apply)


def transformed_view(
    images: torch.Tensor,
    config: LocalAugmentConfig,
    generator: torch.Generator,
    views: int = 1,
    apply: Callable[..., torch.Tensor] = apply_view,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A view for the local loss with ``loss.views=transformed`` and the transform that made it.

    Per image a crop of U(view_crop_fraction) x each side resized back to (H, W), mirrored with
    probability view_flip_prob (:func:`sample_resized_crop`), then the intensity part of
    :func:`pretrain_view`. Returns the view (B, C, H, W) and ``theta`` (B, 2, 3) in float64 on
    the CPU, which says where each view pixel lies in the original image
    (``models.heads.view_points``). ``views`` and ``apply`` as for :func:`pretrain_view`.
    """
    rows = [sample_transformed_view(len(images), config, generator) for _ in range(views)]
    return _apply_views(images, rows, config, True, apply), view_theta(torch.cat(rows))


def _apply_views(
    images: torch.Tensor,
    rows: list[torch.Tensor],
    config: PretrainAugmentConfig,
    crop: bool,
    apply: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """The views of ``images`` whose parameter rows are ``rows`` (one tensor a view), stacked."""
    params = to_device(torch.cat(rows), images.device, images.dtype)
    stacked = images if len(rows) == 1 else images.repeat(len(rows), 1, 1, 1)
    return apply(stacked, params, tuple(config.clip), crop, colour_enabled(config))


def apply_finetune(
    images: torch.Tensor,
    labels: torch.Tensor,
    params: torch.Tensor,
    field: torch.Tensor | None = None,
    geometry: Literal["affine", "crop"] = "affine",
    jitter: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, C, H, W) and labels (B, H, W) augmented with the rows and field of
    :func:`sample_finetune` (whose config gave ``geometry`` and, from :func:`jitter_enabled`,
    ``jitter``), on their device: one resampling, bilinear for the images and nearest for the
    labels, then the colour jitter. Reads no value, so it compiles into one graph."""
    theta = view_theta(params)
    padding: Literal["zeros", "border"] = "border" if geometry == "crop" else "zeros"
    images = warp(images, theta, field, padding=padding)
    labels = warp_labels(labels, theta, field)
    if jitter:
        images = colour_jitter(images, *params[:, THETA:].unbind(dim=1))
    return images, labels


def finetune_augment(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: FinetuneAugmentConfig,
    generator: torch.Generator,
    apply: Callable[..., tuple[torch.Tensor, torch.Tensor]] = apply_finetune,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmentation of (B, C, H, W) images and (B, H, W) labels (docs/augmentation.md;
    supplement 4).

    ``geometry: affine`` (medical, the default): one affine option per image
    (:func:`sample_affine`) and an elastic field (:func:`sample_elastic_field`), applied together
    in one resampling. ``geometry: crop`` (Cityscapes): a crop of U(crop_fraction) x each side
    resized back (:func:`sample_resized_crop`). Bilinear for images, nearest for labels, so the
    two stay aligned. Then, if any jitter option is set, :func:`colour_jitter` on the images;
    with none set no random number is drawn for it. ``config.enabled`` False returns the inputs.
    :func:`sample_finetune`, one copy of its rows to the device, then :func:`apply_finetune`
    (or ``apply``, the trainer's compiled one).
    """
    if not config.enabled:
        return images, labels
    batch, _, height, width = images.shape
    if labels.shape != (batch, height, width):
        raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
    rows, field = sample_finetune(batch, (height, width), config, generator, images.device)
    params = to_device(rows, images.device, images.dtype)
    return apply(images, labels, params, field, config.geometry, jitter_enabled(config))
