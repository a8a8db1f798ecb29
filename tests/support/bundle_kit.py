"""Model bundles with random weights and scans on awkward grids, for the inference tests
(``import bundle_kit``; tests/support is on pytest's path)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from safetensors.torch import save_file

from contraseg.inference.bundle import (
    WEIGHTS,
    Architecture,
    ModelBundle,
    Preprocessing,
    Provenance,
)

TINY_WIDTHS = (4, 8, 8, 8, 8, 8)


def bundle_description(
    in_channels: int = 1,
    num_classes: int = 4,
    label_values: Sequence[int] | None = None,
    orientation: str = "as_stored",
    channel: int | None = None,
    size: tuple[int, int] = (32, 32),
    spacing: tuple[float, float] = (3.0, 3.0),
    absent_classes: str = "count_as_one",
) -> ModelBundle:
    return ModelBundle(
        architecture=Architecture(TINY_WIDTHS, in_channels, num_classes),
        class_names=tuple(["background", *(f"class{i}" for i in range(1, num_classes))]),
        label_values=tuple(label_values or range(num_classes)),
        preprocessing=Preprocessing(
            target_spacing=spacing,
            size=size,
            percentiles=(1.0, 99.0),
            n4=False,
            channel=channel,
            orientation=orientation,  # type: ignore[arg-type]
        ),
        provenance=Provenance(
            dataset="phantom",
            labelled_set="custom",
            train_cases=("a",),
            val_cases=(),
            init="random",
            pretrained="",
            iterations=0,
            best_val_dice=None,
            best_iteration=None,
            contraseg_version="test",
            config_sha256="0" * 64,
        ),
        absent_classes=absent_classes,  # type: ignore[arg-type]
    )


def randomise(network: torch.nn.Module, seed: int) -> None:
    """Random weights and batch-norm statistics, so that eval-mode outputs differ by class."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in network.state_dict().items():
            if tensor.is_floating_point():
                values = torch.randn(tensor.shape, generator=generator) * 0.5
                if name.endswith("running_var"):
                    values = values.abs() + 0.5
                tensor.copy_(values)


def make_bundle(folder: Path, seed: int = 0, **kwargs) -> Path:
    """A bundle folder (model.json + weights.safetensors) with seeded random weights."""
    bundle = bundle_description(**kwargs)
    network = bundle.build_network()
    randomise(network, seed)
    folder.mkdir(parents=True, exist_ok=True)
    bundle.write(folder)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(folder / WEIGHTS))
    return folder


def with_bundle(folder: Path, **changes) -> ModelBundle:
    """The bundle at ``folder`` with some fields replaced (not written)."""
    from contraseg.inference import read_bundle

    return dataclasses.replace(read_bundle(folder), **changes)


def rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    out = np.eye(3)
    out[i, i], out[i, j], out[j, i], out[j, j] = c, -s, s, c
    return out


def oblique_affine(spacing: Sequence[float], degrees: float = 17.0) -> np.ndarray:
    """A rotated, sheared-free oblique grid: two rotations times the voxel sizes."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(2, degrees) @ rotation(0, degrees / 2) @ np.diag(spacing)
    affine[:3, 3] = (-40.0, 25.5, 7.25)
    return affine


def phantom_like(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A smooth image with structure (a bright disc per slice), float32."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    out = np.zeros(tuple(shape), np.float32)
    depth = shape[2] if len(shape) > 2 else 1
    for z in range(depth):
        cx, cy = shape[0] * (0.4 + 0.02 * z), shape[1] * 0.5
        disc = ((x - cx) ** 2 + (y - cy) ** 2) < (min(shape[:2]) / 4) ** 2
        plane = 100.0 + 200.0 * disc + rng.normal(0, 10, disc.shape)
        if len(shape) == 2:
            out[:] = plane
        else:
            out[:, :, z] = plane
    return out


def save(path: Path, data: np.ndarray, affine: np.ndarray, qform: int = 1, sform: int = 1,
         nifti2: bool = False) -> Path:  # fmt: skip
    """Write ``data`` with the given affine and header codes, as a scanner tool would."""
    klass = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    image = klass(data, affine)
    image.set_qform(affine, code=qform)
    image.set_sform(affine, code=sform)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path
