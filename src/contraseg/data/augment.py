"""Batch augmentations as torch ops on the batch's device (method_spec 3.3 and 6.2).

Every random parameter is drawn per image on the CPU from the caller's ``torch.Generator`` and
only then moved to the batch's device, so a seed gives the same augmentation on CPU and GPU and
the GPU never waits on per-image CPU work. The samplers are public so tests (and users) can see
exactly which transform was applied.

Geometry follows ``torch.nn.functional.affine_grid``/``grid_sample`` with
``align_corners=False``: ``theta`` (B, 2, 3) maps normalised output coordinates (x, y in
[-1, 1], the image edges) to normalised input coordinates. Rotations and scalings are built in
pixel units and then normalised, so they stay rigid on non-square images. Pixels rotated or
scaled in from outside the image are 0 (background for labels).

Differences from the official code: brightness/contrast values are drawn per image, not one per
batch (method_spec 9.3); fine-tuning has no intensity augmentation, as the official code in
practice has none (method_spec 9.4); labels are warped with nearest-neighbour sampling, not as
bilinearly warped one-hot maps; the affine and the elastic field are applied in one resampling.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from contraseg.config import FinetuneAugmentConfig, PretrainAugmentConfig

__all__ = [
    "adjust_intensity",
    "finetune_augment",
    "pretrain_view",
    "sample_affine",
    "sample_crop",
    "sample_elastic_field",
    "sample_intensity",
    "warp",
    "warp_labels",
]

# Options of the per-image geometric transform (method_spec 6.2); ROT45 only if config.rot45.
ROTATE, SCALE, FLIP, ROT45, NONE = range(5)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws of U(low, high) in float64 on the CPU."""
    _check_cpu(generator)
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _check_cpu(generator: torch.Generator) -> None:
    # Parameters must come from a CPU generator so that a seed means the same thing everywhere.
    if generator.device.type != "cpu":
        raise ValueError(f"augmentation parameters need a CPU generator, got {generator.device}")


def _to(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """A parameter drawn on the CPU, on the batch's device without waiting for the device: a
    plain copy to a GPU waits for every queued kernel, a pinned asynchronous one does not."""
    tensor = tensor.to(dtype=dtype)
    if tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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


def sample_intensity(
    batch: int, config: PretrainAugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image brightness offsets U(-b, b) and contrast factors U(contrast), each (B,)."""
    brightness = _uniform(batch, -config.brightness, config.brightness, generator)
    contrast = _uniform(batch, *config.contrast, generator)
    return brightness, contrast


def sample_affine(
    batch: int, size: tuple[int, int], config: FinetuneAugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """``theta`` (B, 2, 3): per image one option of method_spec 6.2, chosen with equal probability.

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
        _to(coarse, device, torch.float32), size=size, mode="bicubic", align_corners=True
    )
    return dense.permute(0, 2, 3, 1)


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
    theta = _to(theta, images.device, work)
    identity = torch.eye(2, 3, dtype=work, device=images.device).expand(batch, 2, 3)
    points = F.affine_grid(identity, [batch, 1, height, width], align_corners=False)
    if field is not None:
        to_normalised = _to(
            torch.tensor([2.0 / width, 2.0 / height], dtype=work), images.device, work
        )
        points = points + _to(field, images.device, work) * to_normalised
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
    shape = (-1, 1, 1, 1)
    brightness = _to(brightness, images.device, images.dtype).view(shape)
    contrast = _to(contrast, images.device, images.dtype).view(shape)
    shifted = images + brightness
    mean = shifted.mean(dim=(2, 3), keepdim=True)
    return ((shifted - mean) * contrast + mean).clamp(clip[0], clip[1])


def pretrain_view(
    images: torch.Tensor,
    config: PretrainAugmentConfig,
    generator: torch.Generator,
    crop: bool = True,
) -> torch.Tensor:
    """One augmented view (B, C, H, W) for contrastive pre-training (method_spec 3.3).

    Random square crop resized back to (H, W) (bilinear), then per-image brightness/contrast and
    clipping. ``crop=False`` applies the intensity part only, for the local loss, whose two views
    must stay in pixel correspondence.
    """
    batch, _, height, width = images.shape
    if crop:
        theta = sample_crop(batch, (height, width), config, generator)
        images = warp(images, theta, padding="border")
    brightness, contrast = sample_intensity(batch, config, generator)
    return adjust_intensity(images, brightness, contrast, config.clip)


def finetune_augment(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: FinetuneAugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Geometric augmentation of (B, C, H, W) images and (B, H, W) labels (method_spec 6.2).

    One affine option per image (:func:`sample_affine`) and an elastic field
    (:func:`sample_elastic_field`), applied together in one resampling: bilinear for images,
    nearest for labels, so the two stay aligned. ``config.enabled`` False returns the inputs.
    """
    if not config.enabled:
        return images, labels
    batch, _, height, width = images.shape
    if labels.shape != (batch, height, width):
        raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
    theta = sample_affine(batch, (height, width), config, generator)
    field = sample_elastic_field(batch, (height, width), config, generator, images.device)
    return warp(images, theta, field), warp_labels(labels, theta, field)
