"""The model bundle: a folder that describes a trained model well enough to use it anywhere.

A finished fine-tuning run, or any folder holding just these two files, is a bundle::

    model.json            what prediction needs, resolved (see :class:`ModelBundle`)
    weights.safetensors   the UNet's tensors (safetensors: no pickle, nothing executed)

Like nnU-Net's trained-model folder (``plans.json`` and ``dataset.json`` beside the weights), the
bundle needs neither the training data nor the training code: ``contraseg predict`` and
:class:`contraseg.inference.Segmenter` take it alone. Loading checks the format version, every
field's type and range, and that every tensor matches the architecture, and says in one line
what is missing or wrong (docs/inference.md lists the fields).

Format versions: 1 had no ``absent_classes``; it is read as ``"count_as_one"``, the rule of
every dataset that version-1 bundles were trained on. 2 is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from contraseg import fileio
from contraseg.data.orientation import ORIENTATIONS, Orientation
from contraseg.data.preprocess import NORMALISE_MASKS, NormaliseMask
from contraseg.data.readers.base import ABSENT_CLASSES, AbsentClasses
from contraseg.errors import InputError
from contraseg.fileio import one_line
from contraseg.models.unet import DOWNSAMPLING, NUM_DECODER_BLOCKS, UNet

FORMAT = "contraseg-model"
FORMAT_VERSION = 3  # 2: absent_classes; 3: normalise_mask, foreground_fractions
READS_VERSIONS = (1, 2, 3)
MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"
SLICE_AXIS = 2  # the only slice axis the preprocessing knows (docs/data.md)
# sanity bounds: a value outside is a damaged or hand-edited file, not a model
MAX_WIDTH = 65536
MAX_CHANNELS = 4096
MAX_LABEL_VALUE = 65535  # label maps are written as uint8 or uint16
MAX_SIZE = 16384

__all__ = [
    "FORMAT_VERSION",
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
    slice_axis: int = SLICE_AXIS  # slices are taken along this axis of the oriented volume
    normalise_mask: NormaliseMask = "none"  # where the percentiles are taken (docs/data.md)
    # foreground fraction of each training case: predict warns about scans far from them
    foreground_fractions: tuple[float, ...] = ()


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
    absent_classes: AbsentClasses = "count_as_one"  # per-image Dice rule (docs/metrics.md)
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
# Reading model.json: every field checked, every problem one line naming the file and the key


class _Fields:
    """Typed access to one JSON object of ``model.json``; errors name the dotted key."""

    def __init__(self, obj: Any, path: Path, where: str) -> None:
        if not isinstance(obj, dict):
            raise InputError(path, f"'{where}' must be a JSON object")
        self.obj, self.path, self.where = obj, path, where

    def error(self, key: str, problem: str) -> InputError:
        name = f"{self.where}.{key}" if self.where else key
        return InputError(self.path, f"'{name}' {problem}")

    def get(self, key: str) -> Any:
        if key not in self.obj:
            raise self.error(key, "is missing")
        return self.obj[key]

    def section(self, key: str) -> _Fields:
        return _Fields(self.get(key), self.path, f"{self.where}.{key}" if self.where else key)

    def integer(self, key: str, low: int, high: int, optional: bool = False) -> Any:
        value = self.get(key)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(key, f"must be an integer in {low}..{high}, got {value!r}")
        return value

    def integers(self, key: str, low: int, high: int, length: int | None = None) -> tuple[int, ...]:
        values = self.get(key)
        ok = isinstance(values, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in values
        )
        if not ok or (length is not None and len(values) != length):
            count = f"{length} " if length is not None else ""
            raise self.error(key, f"must be a list of {count}integers in {low}..{high}")
        return tuple(values)

    def numbers(self, key: str, length: int | None, low: float, high: float) -> tuple[float, ...]:
        """A list of finite numbers in ``low..high``, of ``length`` entries (any if None)."""
        values = self.get(key)
        ok = (
            isinstance(values, list)
            and (length is None or len(values) == length)
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
            and all(math.isfinite(v) and low <= v <= high for v in values)
        )
        if not ok:
            count = "" if length is None else f"{length} "
            raise self.error(key, f"must be a list of {count}finite numbers in {low:g}..{high:g}")
        return tuple(float(v) for v in values)

    def number(self, key: str, low: float, high: float, optional: bool = False) -> float | None:
        value = self.get(key)
        if value is None and optional:
            return None
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not low <= value <= high:
            raise self.error(key, f"must be a number in {low:g}..{high:g}, got {value!r}")
        return float(value)

    def string(self, key: str, choices: Sequence[str] = ()) -> Any:
        value = self.get(key)
        if not isinstance(value, str) or (choices and value not in choices):
            wanted = f"one of {', '.join(choices)}" if choices else "a string"
            raise self.error(key, f"must be {wanted}, got {value!r}")
        return value

    def strings(self, key: str, length: int | None = None) -> tuple[str, ...]:
        values = self.get(key)
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise self.error(key, "must be a list of strings")
        if length is not None and len(values) != length:
            raise self.error(key, f"must hold {length} names, got {len(values)}")
        return tuple(values)

    def boolean(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value


def _parse_version(obj: Any, path: Path) -> int:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise InputError(path, f'not a contraseg model description (no "format": "{FORMAT}")')
    version = obj.get("format_version")
    if version not in READS_VERSIONS or isinstance(version, bool):
        newer = isinstance(version, int) and version > FORMAT_VERSION
        hint = ": it was written by a newer contraseg" if newer else ""
        raise InputError(
            path,
            f"format_version {version!r} is not supported{hint} (this contraseg reads "
            f"{', '.join(map(str, READS_VERSIONS))})",
        )
    return int(version)


def _parse(obj: Any, path: Path) -> ModelBundle:
    version = _parse_version(obj, path)
    top = _Fields(obj, path, "")
    arch = top.section("architecture")
    architecture = Architecture(
        widths=arch.integers("widths", 1, MAX_WIDTH, NUM_DECODER_BLOCKS + 1),
        in_channels=arch.integer("in_channels", 1, MAX_CHANNELS),
        num_classes=arch.integer("num_classes", 2, MAX_LABEL_VALUE + 1),
    )
    classes = architecture.num_classes
    names = top.strings("class_names", classes)
    if len(set(names)) != len(names):
        raise top.error("class_names", "must be distinct")
    values = top.integers("label_values", 0, MAX_LABEL_VALUE, classes)
    if len(set(values)) != len(values) or values[0] != 0:
        raise top.error("label_values", "must be distinct, with 0 (background) first")
    pre = top.section("preprocessing")
    size = pre.integers("size", DOWNSAMPLING, MAX_SIZE, 2)
    if any(s % DOWNSAMPLING for s in size):
        raise pre.error("size", f"must be multiples of {DOWNSAMPLING}, got {list(size)}")
    percentiles = pre.numbers("percentiles", 2, 0.0, 100.0)
    if percentiles[0] >= percentiles[1]:
        raise pre.error("percentiles", f"must be [low, high] with low < high: {list(percentiles)}")
    channel = pre.integer("channel", 0, MAX_CHANNELS - 1, optional=True)
    if channel is not None and architecture.in_channels != 1:
        raise pre.error("channel", "must be null for a network of several input channels")
    spacing = pre.numbers("target_spacing", 2, 1e-6, 1e6)
    preprocessing = Preprocessing(
        target_spacing=(spacing[0], spacing[1]),
        size=(size[0], size[1]),
        percentiles=(percentiles[0], percentiles[1]),
        n4=pre.boolean("n4"),
        channel=channel,
        orientation=pre.string("orientation", ORIENTATIONS),
        slice_axis=pre.integer("slice_axis", SLICE_AXIS, SLICE_AXIS),
        normalise_mask=pre.string("normalise_mask", NORMALISE_MASKS) if version >= 3 else "none",
        foreground_fractions=pre.numbers("foreground_fractions", None, 0.0, 1.0)
        if version >= 3
        else (),
    )
    prov = top.section("provenance")
    provenance = Provenance(
        dataset=prov.string("dataset"),
        labelled_set=prov.string("labelled_set"),
        train_cases=prov.strings("train_cases"),
        val_cases=prov.strings("val_cases"),
        init=prov.string("init"),
        pretrained=prov.string("pretrained"),
        iterations=prov.integer("iterations", 0, 2**62),
        best_val_dice=prov.number("best_val_dice", 0.0, 1.0, optional=True),
        best_iteration=prov.integer("best_iteration", 0, 2**62, optional=True),
        contraseg_version=prov.string("contraseg_version"),
        config_sha256=prov.string("config_sha256"),
    )
    absent = top.string("absent_classes", ABSENT_CLASSES) if version >= 2 else "count_as_one"
    return ModelBundle(
        architecture=architecture,
        class_names=names,
        label_values=values,
        preprocessing=preprocessing,
        provenance=provenance,
        absent_classes=absent,
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
            json_path,
            f"model description not found{hint}: give a finished finetune run or a folder "
            "holding model.json and weights.safetensors",
        )
    try:
        obj = json.loads(json_path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise InputError(json_path, f"not valid JSON: {one_line(err)}") from None
    return _parse(obj, json_path)


def check_weights(
    path: Path, weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    """Every expected tensor present with its shape and dtype, nothing else, all finite."""
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
                f"'{key}' has shape {tuple(tensor.shape)}, the architecture in model.json "
                f"needs {tuple(want.shape)}",
            )
        if tensor.dtype != want.dtype:
            raise InputError(
                path, f"'{key}' is {tensor.dtype}, the architecture needs {want.dtype}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(path, f"'{key}' holds NaN or infinite values")


def load_bundle(path: str | Path) -> tuple[ModelBundle, UNet]:
    """The bundle at ``path`` and its network with the weights loaded, in eval mode (CPU).

    The weights are checked against the architecture built on PyTorch's ``meta`` device (shapes
    only, no memory), so a damaged ``model.json`` cannot make loading allocate a huge network.
    """
    bundle = read_bundle(path)
    weights_path = bundle_folder(path) / WEIGHTS
    if not weights_path.is_file():
        raise InputError(weights_path, "weights not found next to model.json")
    try:
        weights = load_file(str(weights_path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        problem = f"not a readable safetensors file (no pickle is ever loaded): {one_line(err)}"
        raise InputError(weights_path, problem) from None
    with torch.device("meta"):
        expected = bundle.build_network().state_dict()
    check_weights(weights_path, weights, expected)
    network = bundle.build_network()
    network.load_state_dict(weights)
    return bundle, network.eval()
