"""The model bundle: a folder that describes a trained model well enough to use it anywhere.

A finished fine-tuning run, or any folder holding just these two files, is a bundle::

    model.json            what prediction needs, resolved (see :class:`ModelBundle`)
    weights.safetensors   the UNet's tensors (safetensors: no pickle, nothing executed)

Like nnU-Net's trained-model folder (``plans.json`` and ``dataset.json`` beside the weights), the
bundle needs neither the training data nor the training code: ``contraseg predict`` and
:class:`contraseg.inference.Segmenter` take it alone. Loading checks the format version and
that every tensor matches the architecture, and says in one line what is missing or wrong.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from contraseg import fileio
from contraseg.data.orientation import ORIENTATIONS, Orientation
from contraseg.errors import InputError
from contraseg.models.unet import UNet

FORMAT = "contraseg-model"
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"

__all__ = [
    "MODEL_JSON",
    "WEIGHTS",
    "Architecture",
    "ModelBundle",
    "Preprocessing",
    "Provenance",
    "check_weights",
    "load_bundle",
    "read_bundle",
]


@dataclass(frozen=True)
class Architecture:
    """The UNet of ``contraseg.models.unet`` is fully described by these three values."""

    widths: tuple[int, ...]
    in_channels: int
    num_classes: int


@dataclass(frozen=True)
class Preprocessing:
    """How a stored volume becomes the network's input (docs/data.md), resolved to values."""

    target_spacing: tuple[float, float]  # in-plane mm
    size: tuple[int, int]  # in-plane crop/pad size in pixels
    percentiles: tuple[float, float]
    n4: bool
    channel: int | None  # a 4-D image keeps only this channel; None: all channels are inputs
    orientation: Orientation  # contraseg.data.orientation
    slice_axis: int = 2  # slices are taken along this axis of the oriented volume


@dataclass(frozen=True)
class Provenance:
    """Where the model came from: enough to reproduce or question it."""

    dataset: str
    labelled_set: str  # "tr1/c1", "all", or "custom"
    train_cases: tuple[str, ...]
    val_cases: tuple[str, ...]
    init: str
    pretrained: str
    iterations: int
    best_val_dice: float | None  # None without validation
    best_iteration: int | None
    contraseg_version: str
    config_sha256: str


@dataclass(frozen=True)
class ModelBundle:
    """The contents of ``model.json``."""

    architecture: Architecture
    class_names: tuple[str, ...]  # index 0 is background
    label_values: tuple[int, ...]  # value written to label maps for each class index
    preprocessing: Preprocessing
    provenance: Provenance
    format_version: int = field(default=FORMAT_VERSION)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    def write(self, folder: str | Path) -> Path:
        """Write ``model.json`` atomically into ``folder``; returns its path."""
        path = Path(folder) / MODEL_JSON
        fileio.write_json(path, self.to_json())
        return path

    def build_network(self) -> UNet:
        arch = self.architecture
        return UNet(arch.in_channels, arch.num_classes, arch.widths)


# ---------------------------------------------------------------------------------------------
# Reading model.json: every field checked, every problem one line naming the file


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path, where: str):
    if key not in obj:
        raise InputError(path, f"'{where}{key}' is missing")
    value = obj[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise InputError(path, f"'{where}{key}' has the wrong type: {value!r}")
    if not isinstance(value, kind):
        raise InputError(path, f"'{where}{key}' has the wrong type: {value!r}")
    return value


def _ints(values: Any, path: Path, key: str, length: int | None = None) -> tuple[int, ...]:
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise InputError(path, f"'{key}' must be a list of integers")
    if length is not None and len(values) != length:
        raise InputError(path, f"'{key}' must hold {length} values, got {len(values)}")
    return tuple(values)


def _floats(values: Any, path: Path, key: str, length: int) -> tuple[float, ...]:
    if (
        not isinstance(values, list)
        or len(values) != length
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    ):
        raise InputError(path, f"'{key}' must be a list of {length} numbers")
    return tuple(float(v) for v in values)


def _parse(obj: Any, path: Path) -> ModelBundle:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise InputError(path, f'not a contraseg model description (no "format": "{FORMAT}")')
    version = obj.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(
            path,
            f"format_version {version!r} is not supported by this contraseg "
            f"(reads version {FORMAT_VERSION})",
        )
    arch = _get(obj, "architecture", dict, path, "")
    widths = _ints(_get(arch, "widths", list, path, "architecture."), path, "widths", 6)
    in_channels = _get(arch, "in_channels", int, path, "architecture.")
    num_classes = _get(arch, "num_classes", int, path, "architecture.")
    if min(widths) < 1 or in_channels < 1 or num_classes < 2:
        raise InputError(path, "architecture: widths and in_channels >= 1, num_classes >= 2")
    names = _get(obj, "class_names", list, path, "")
    if len(names) != num_classes or not all(isinstance(n, str) for n in names):
        raise InputError(path, f"'class_names' must hold {num_classes} names")
    values = _ints(_get(obj, "label_values", list, path, ""), path, "label_values", num_classes)
    if len(set(values)) != len(values) or min(values) < 0 or max(values) > 65535:
        raise InputError(path, "'label_values' must be distinct integers in 0..65535")
    pre = _get(obj, "preprocessing", dict, path, "")
    spacing = _floats(pre.get("target_spacing"), path, "preprocessing.target_spacing", 2)
    size = _ints(pre.get("size"), path, "preprocessing.size", 2)
    percentiles = _floats(pre.get("percentiles"), path, "preprocessing.percentiles", 2)
    channel = pre.get("channel")
    if channel is not None and (not isinstance(channel, int) or isinstance(channel, bool)):
        raise InputError(path, "'preprocessing.channel' must be an integer or null")
    orientation = _get(pre, "orientation", str, path, "preprocessing.")
    if orientation not in ORIENTATIONS:
        raise InputError(path, f"'preprocessing.orientation' must be one of {ORIENTATIONS}")
    if min(spacing) <= 0 or min(size) < 32 or any(s % 32 for s in size):
        raise InputError(path, "preprocessing: spacing > 0 and sizes multiples of 32 are needed")
    prov = _get(obj, "provenance", dict, path, "")
    try:
        provenance = Provenance(
            **{
                f.name: tuple(prov[f.name])
                if f.name in ("train_cases", "val_cases")
                else prov[f.name]
                for f in dataclasses.fields(Provenance)
            }
        )
    except (KeyError, TypeError) as err:
        raise InputError(path, f"'provenance' is incomplete: {err}") from None
    return ModelBundle(
        architecture=Architecture(widths, in_channels, num_classes),
        class_names=tuple(names),
        label_values=values,
        preprocessing=Preprocessing(
            target_spacing=(spacing[0], spacing[1]),
            size=(size[0], size[1]),
            percentiles=(percentiles[0], percentiles[1]),
            n4=bool(_get(pre, "n4", bool, path, "preprocessing.")),
            channel=channel,
            orientation=orientation,
            slice_axis=_get(pre, "slice_axis", int, path, "preprocessing."),
        ),
        provenance=provenance,
        format_version=version,
    )


def bundle_folder(path: str | Path) -> Path:
    """The folder of a bundle given as that folder or as its ``model.json``."""
    path = Path(path)
    return path.parent if path.name == MODEL_JSON else path


def read_bundle(path: str | Path) -> ModelBundle:
    """Parse and check ``model.json`` of the bundle at ``path`` (folder or file)."""
    json_path = bundle_folder(path) / MODEL_JSON
    if not json_path.is_file():
        where = bundle_folder(path)
        hint = "" if where.is_dir() else " (no such folder)"
        raise InputError(
            json_path, f"model description not found{hint}: give a finished finetune run"
        )
    try:
        obj = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(json_path, f"not valid JSON: {str(err).splitlines()[0]}") from None
    return _parse(obj, json_path)


def check_weights(
    path: Path, weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    """Every expected tensor present with its shape and dtype, nothing else."""
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        raise InputError(path, f"{len(missing)} tensors missing, e.g. '{missing[0]}'")
    if extra:
        raise InputError(
            path, f"{len(extra)} tensors the architecture has no place for: '{extra[0]}'"
        )
    for key, tensor in weights.items():
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise InputError(
                path,
                f"'{key}' has shape {tuple(tensor.shape)}, the architecture needs "
                f"{tuple(want.shape)}",
            )
        if tensor.dtype != want.dtype:
            raise InputError(
                path, f"'{key}' is {tensor.dtype}, the architecture needs {want.dtype}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(path, f"'{key}' holds NaN or infinite values")


def load_bundle(path: str | Path) -> tuple[ModelBundle, UNet]:
    """The bundle at ``path`` and its network with the weights loaded, in eval mode (CPU)."""
    bundle = read_bundle(path)
    weights_path = bundle_folder(path) / WEIGHTS
    if not weights_path.is_file():
        raise InputError(weights_path, "weights not found next to model.json")
    try:
        weights = load_file(str(weights_path))
    except (OSError, SafetensorError) as err:
        raise InputError(weights_path, f"cannot load weights: {err}") from None
    network = bundle.build_network()
    check_weights(weights_path, weights, network.state_dict())
    network.load_state_dict(weights)
    return bundle, network.eval()
