"""Typed run configurations: dataclasses, strict YAML loading, ``key=value`` overrides.

Every command reads one of the ``*Run`` dataclasses below. A YAML file and command-line
overrides are merged onto the defaults; an unknown or misspelt key is an :class:`InputError`
that names the key and suggests the closest valid one, a value of the wrong type names the key
and the expected type. Every field is declared with :func:`option`, which carries its one-line
help (``contraseg config show``) and the rule its value must satisfy (range, length, order,
multiple of, which datasets use it); :func:`validate` checks every rule when a config is loaded,
so a bad value is refused before a run directory is created (docs/reliability.md). The resolved
config, with absolute paths and only the keys its dataset uses, is written as ``config.yaml`` in
every run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from contraseg import fileio
from contraseg.errors import InputError

__all__ = [
    "RUN_CLASSES",
    "DataConfig",
    "FinetuneAugmentConfig",
    "FinetuneConfig",
    "FinetuneRun",
    "GlobalLossConfig",
    "LocalAugmentConfig",
    "LocalLossConfig",
    "ModelConfig",
    "OptimConfig",
    "PrepareRun",
    "PretrainAugmentConfig",
    "PretrainGlobalRun",
    "PretrainLocalRun",
    "deep_merge",
    "describe",
    "from_dict",
    "load_config",
    "parse_overrides",
    "read_yaml",
    "save_config",
    "to_dict",
    "validate",
]

# Every integer a config may hold fits a signed 64-bit integer (torch and numpy need it).
INT64 = (-(2**63), 2**63 - 1)
SEED_MAX = 2**32 - 2  # numpy and torch seeds; the trainer also uses seed + 1
ITERATIONS_MAX = 10**9
BATCH_MAX = 4096
SIZE_MAX = 4096  # in-plane pixels per axis
DIVISOR = 32  # the UNet halves its input five times


@dataclass(frozen=True)
class Rule:
    """What a field's value must satisfy; the message of a violation names the key."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # value > low instead of >= low
    length: tuple[int, int] | None = None  # allowed list lengths, inclusive
    ordered: Literal["", "increasing", "non-decreasing"] = ""
    unique: bool = False
    multiple_of: int | None = None
    axes: int | None = None  # a scalar means the same value on each of this many axes
    path: bool = False  # a file or folder: stored absolute
    readers: tuple[str, ...] = ()  # the datasets that use this key; empty: every dataset


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    factory: Callable[[], Any] | None = None,
    **rule: Any,
) -> Any:
    """A dataclass field with its help text and :class:`Rule` in the field's metadata."""
    metadata = {"help": help, "rule": Rule(**rule)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# Rules of a (low, high) range of non-negative factors (no change: [1, 1]) and of a largest
# hue shift in turns (half a turn reaches every hue), shared by the colour-jitter keys.
_FACTORS: dict[str, Any] = {
    "low": 0.0,
    "high": 100.0,
    "length": (2, 2),
    "ordered": "non-decreasing",
}
_HUE: dict[str, Any] = {"low": 0.0, "high": 0.5}
# Rules of a (low, high) range of crop sides as fractions of the image side.
_FRACTIONS: dict[str, Any] = {
    "low": 0.0,
    "low_open": True,
    "high": 1.0,
    "length": (2, 2),
    "ordered": "non-decreasing",
}


# ---------------------------------------------------------------------------------------------
# Sections shared by several stages

Dataset = Literal["acdc", "phantom", "prostate", "mmwhs", "nnunet", "cityscapes"]
DATASETS: tuple[str, ...] = get_args(Dataset)
GENERATED_SPLITS = ("phantom", "nnunet", "cityscapes")


@dataclass
class DataConfig:
    """Which dataset, where, and how it is preprocessed (see ``contraseg.data.preprocess``)."""

    dataset: Dataset = option("phantom", help="reader of the dataset's layout (docs/datasets.md)")
    root: str = option("data/phantom", help="dataset folder", path=True)
    cache: str = option(
        "", help="folder of preprocessed arrays; empty: <root>/.contraseg-cache", path=True
    )
    target_spacing: list[float] | None = option(
        None,
        help="in-plane spacing in mm after resampling (one value: both axes); null: the reader's",
        low=0.0,
        low_open=True,
        high=1000.0,
        length=(2, 2),
        axes=2,
    )
    size: list[int] | None = option(
        None,
        help="in-plane crop/pad size in pixels, multiples of 32 (one value: both); null: reader's",
        low=DIVISOR,
        high=SIZE_MAX,
        multiple_of=DIVISOR,
        length=(2, 2),
        axes=2,
    )
    n4: bool = option(False, help="N4 bias correction before normalising (paper: on; slow, cached)")
    percentiles: list[float] = option(
        help="intensity percentiles mapped to 0 and 1, per volume and channel",
        factory=lambda: [1.0, 99.0],
        low=0.0,
        high=100.0,
        length=(2, 2),
        ordered="increasing",
    )
    normalise_mask: Literal["none", "nonzero", "otsu"] = option(
        "none",
        help="take the percentiles inside the foreground (nonzero: skull-stripped or masked "
        "scans; otsu: a thresholded body) and zero the rest",
    )
    frames: list[Literal["ED", "ES"]] = option(
        help="cardiac frames to read: [ED], [ES] or [ED, ES]",
        factory=lambda: ["ED"],
        length=(1, 2),
        unique=True,
        readers=("acdc", "phantom"),
    )
    channel: int | None = option(
        0,
        help="channel of a 4-D image to keep (0 = T2); null: a 4-D image is an error",
        low=0,
        high=63,
        readers=("prostate",),
    )
    fold: int = option(
        0,
        help="fold of splits_final.json: its train cases train, its val cases validate",
        low=0,
        high=1000,
        readers=("nnunet",),
    )
    unlabelled: list[str] = option(
        help="extra folders or globs of unlabelled images for pre-training (relative to root); "
        "imagesUnlabelled/ is always read",
        factory=list,
        path=False,
        readers=("nnunet",),
    )
    split_seed: int = option(
        0,
        help="seed of a generated split (datasets without the paper's packaged split)",
        low=0,
        high=SEED_MAX,
        readers=GENERATED_SPLITS,
    )


@dataclass
class ModelConfig:
    """UNet and heads (the paper's supplement 1.1)."""

    widths: list[int] = option(
        help="channels of the six encoder blocks (the decoder mirrors them)",
        factory=lambda: [16, 32, 64, 128, 128, 128],
        low=1,
        high=2048,
        length=(6, 6),
    )
    in_channels: int = option(0, help="input channels; 0: from the dataset", low=0, high=64)
    num_classes: int = option(
        0, help="classes including background; 0: from the dataset", low=0, high=1024
    )
    g1_hidden: int = option(1024, help="hidden units of the global head g1", low=1, high=65536)
    g1_out: int = option(128, help="output dimension of g1", low=1, high=65536)
    g1_batch_norm: bool = option(
        True,
        help="batch norm after g1's hidden layer, as the paper's supplement 1.1 says (false: the "
        "official code's g1, in which G^D can collapse: docs/data.md)",
    )
    g2_out: int = option(128, help="dimension of a local region embedding (g2)", low=1, high=65536)
    g2_project: bool = option(
        True, help="flatten K x K regions and project them by a shared dense layer (official)"
    )

    def check(self) -> None:
        if self.num_classes == 1:
            raise InputError("num_classes", "must be 0 (from the dataset) or at least 2, got 1")


@dataclass
class OptimConfig:
    """Adam and the loop's rhythm."""

    iterations: int = option(10000, help="training iterations", low=1, high=ITERATIONS_MAX)
    lr: float = option(1e-3, help="Adam learning rate", low=0.0, low_open=True, high=10.0)
    batch_size: int = option(
        12, help="images per batch where the stage draws random slices", low=1, high=BATCH_MAX
    )
    checkpoint_every: int = option(
        500,
        help="iterations between checkpoints (capped at the run's length)",
        low=1,
        high=ITERATIONS_MAX,
    )
    log_every: int = option(
        10, help="iterations between lines of metrics.jsonl", low=1, high=ITERATIONS_MAX
    )


@dataclass
class PretrainAugmentConfig:
    """Per-image random crop-and-resize and brightness/contrast (docs/augmentation.md), and the
    saturation/hue of the supplement's colour jitter for RGB images."""

    crop_fraction: list[float] = option(
        help="range of the crop's side as a fraction of the image side",
        factory=lambda: [0.5, 0.6],
        **_FRACTIONS,
    )
    brightness: float = option(
        0.3, help="brightness offsets drawn from U(-b, b)", low=0.0, high=100.0
    )
    contrast: list[float] = option(
        help="range of the contrast factor",
        factory=lambda: [0.7, 1.3],
        low=0.0,
        low_open=True,
        high=100.0,
        length=(2, 2),
        ordered="non-decreasing",
    )
    clip: list[float] = option(
        help="intensities are clipped to [low, high] after the intensity transform",
        factory=lambda: [0.0, 1.5],
        low=-1e6,
        high=1e6,
        length=(2, 2),
        ordered="increasing",
    )
    crop_shape: Literal["square", "aspect"] = option(
        "square",
        help="square: the crop is a square of the shorter side's fraction (official); aspect: "
        "the same fraction of each side (non-square images, e.g. Cityscapes)",
    )
    saturation: list[float] = option(
        help="range of the saturation factor (RGB images, supplement 4); [1, 1]: off",
        factory=lambda: [1.0, 1.0],
        **_FACTORS,
    )
    hue: float = option(
        0.0, help="hue shifts drawn from U(-h, h) turns (RGB images, supplement 4); 0: off", **_HUE
    )


@dataclass
class LocalAugmentConfig(PretrainAugmentConfig):
    """Stage 2's views: intensity only, or with ``loss.views=transformed`` also their own crop
    and flip each (docs/local-views.md)."""

    view_crop_fraction: list[float] = option(
        help="loss.views=transformed: range of each view's crop side as a fraction of each image "
        "side (aspect kept)",
        factory=lambda: [0.6, 1.0],
        **_FRACTIONS,
    )
    view_flip_prob: float = option(
        0.5,
        help="loss.views=transformed: probability that a view is flipped left-right",
        low=0.0,
        high=1.0,
    )


@dataclass
class FinetuneAugmentConfig:
    """Geometric augmentation of image and label together (docs/augmentation.md)."""

    enabled: bool = option(True, help="augment the labelled slices")
    rotation_deg: float = option(
        15.0, help="largest rotation in degrees (either way)", low=0.0, high=180.0
    )
    scale: list[float] = option(
        help="range of the zoom factor",
        factory=lambda: [0.95, 1.05],
        low=0.0,
        low_open=True,
        high=10.0,
        length=(2, 2),
        ordered="non-decreasing",
    )
    flip_prob: float = option(0.5, help="probability of a flip", low=0.0, high=1.0)
    rot45: bool = option(True, help="include the official 45-degree rotation option")
    elastic_sigma_px: float = option(
        5.0, help="std of the elastic control-point displacements in pixels", low=0.0, high=1000.0
    )
    elastic_grid: int = option(3, help="elastic control points per axis", low=2, high=64)
    elastic_prob: float = option(
        0.5, help="probability of an elastic deformation", low=0.0, high=1.0
    )
    geometry: Literal["affine", "crop"] = option(
        "affine",
        help="affine: one affine option + elastic deformation (medical); crop: a random crop "
        "resized back to the image size (Cityscapes, supplement 4), the affine keys unused",
    )
    crop_fraction: list[float] = option(
        help="geometry=crop: range of the crop's side as a fraction of each image side",
        factory=lambda: [0.5, 1.0],
        **_FRACTIONS,
    )
    brightness: float = option(
        0.0,
        help="colour jitter: brightness offsets drawn from U(-b, b); 0: off",
        low=0.0,
        high=100.0,
    )
    contrast: list[float] = option(
        help="colour jitter: range of the contrast factor about each channel's mean; [1, 1]: off",
        factory=lambda: [1.0, 1.0],
        **_FACTORS,
    )
    saturation: list[float] = option(
        help="colour jitter: range of the saturation factor (RGB images); [1, 1]: off",
        factory=lambda: [1.0, 1.0],
        **_FACTORS,
    )
    hue: float = option(
        0.0, help="colour jitter: hue shifts drawn from U(-h, h) turns (RGB images); 0: off", **_HUE
    )


# ---------------------------------------------------------------------------------------------
# Stage-specific sections


@dataclass
class GlobalLossConfig:
    """The global contrastive loss of stage 1 (docs/training.md)."""

    strategy: Literal["GR", "GD-", "GD"] = option(
        "GD", help="positives: GR two views; GD- GR minus same-partition negatives; GD adds them"
    )
    partitions: int = option(4, help="partitions S along the slice axis", low=1, high=64)
    volumes_per_batch: int = option(
        3,
        help="volumes m per batch; the batch holds m * S images, two views each",
        low=1,
        high=1024,
    )
    temperature: float = option(
        0.1, help="softmax temperature of the similarities", low=0.0, low_open=True, high=100.0
    )


@dataclass
class LocalLossConfig:
    """The local contrastive loss of stage 2 (docs/training.md)."""

    strategy: Literal["LR", "LD"] = option(
        "LR", help="positives: LR same region of the other view; LD also of other volumes"
    )
    decoder_blocks: int = option(3, help="decoder blocks l trained (d_1..d_l)", low=1, high=5)
    region_size: Literal[1, 3] = option(3, help="side K of a local region in feature pixels")
    negatives: Literal["official", "all"] = option(
        "official", help="official: the 13-region grid's 5 neighbours; all: every other region"
    )
    partitions: int = option(4, help="partitions S (LD)", low=1, high=64)
    volumes_per_batch: int = option(3, help="volumes m per batch (LD)", low=1, high=1024)
    temperature: float = option(
        0.1, help="softmax temperature of the similarities", low=0.0, low_open=True, high=100.0
    )
    views: Literal["aligned", "transformed"] = option(
        "aligned",
        help="aligned: intensity-only views, region u at one place in both (the paper); "
        "transformed: each view its own crop and flip, region u where each view shows it",
    )
    encoder_bn: Literal["frozen", "batch"] = option(
        "frozen",
        help="batch norm of the frozen encoder: frozen: stage 1's running statistics; batch: "
        "each batch's statistics, as the official code (weights frozen either way)",
    )
    k1_regions: Literal["shared", "official"] = option(
        "shared",
        help="regions when region_size=1: shared: the 3x3 grid's 17 regions and negatives; "
        "official: the official code's own 1x1 lists (13 regions)",
    )


@dataclass
class FinetuneConfig:
    """Which labelled volumes, from which initialisation (docs/training.md)."""

    labelled_volumes: Literal[1, 2, 8, "all"] = option(
        1, help="size of the labelled set from the dataset's split; all: the benchmark set"
    )
    combination: str = option("c1", help="which labelled set of that size: c1, c2, ...")
    train: list[str] | None = option(
        None, help="training cases by id, instead of labelled_volumes and combination"
    )
    val: list[str] | None = option(
        None, help="validation cases by id (with train); []: no validation, keep the last weights"
    )
    init: Literal["random", "encoder", "encoder+decoder"] = option(
        "random", help="what is loaded from finetune.pretrained"
    )
    pretrained: str = option(
        "",
        help="run directory of a pre-training stage (pretrain-global, -local, -joint, -pretext)",
        path=True,
    )
    loss: Literal["dice", "dice_fg", "ce", "dice_ce"] = option(
        "dice", help="segmentation loss (docs/training.md)"
    )
    val_every: int = option(
        50, help="iterations between validations (model selection)", low=1, high=ITERATIONS_MAX
    )
    # Extensions (docs/extensions.md); off by default.
    mixup_alpha: float = option(
        0.0,
        help="Mixup: images and one-hot labels mixed with lam ~ Beta(alpha, alpha) "
        "(Zhang et al. 2018; the official helper's alpha is 0.1); 0: off",
        low=0.0,
        high=1000.0,
    )
    self_training_rounds: int = option(
        0,
        help="self-training rounds after the first fine-tune, each on labelled + "
        "pseudo-labelled slices of the unlabelled pre-training volumes; 0: off",
        low=0,
        high=100,
    )
    pseudo_threshold: float = option(
        0.9,
        help="self-training: pseudo-labelled pixels whose largest softmax probability is below "
        "this are ignored by the loss",
        low=0.0,
        high=1.0,
    )
    pseudo_fraction: float = option(
        0.5,
        help="self-training: share of each batch drawn from pseudo-labelled slices (at least "
        "one slice of each kind)",
        low=0.0,
        low_open=True,
        high=1.0,
    )

    def check(self) -> None:
        if not self.self_training_rounds:
            base = FinetuneConfig()
            for key in ("pseudo_threshold", "pseudo_fraction"):
                if getattr(self, key) != getattr(base, key):
                    raise InputError(key, "applies only with finetune.self_training_rounds > 0")


# ---------------------------------------------------------------------------------------------
# One dataclass per command

_SEED = {"help": "seed of initialisation, sampling and augmentation", "low": 0, "high": SEED_MAX}


@dataclass
class PrepareRun:
    """``contraseg prepare``: the data section alone."""

    data: DataConfig = option(help="dataset and preprocessing", factory=DataConfig)


@dataclass
class PretrainGlobalRun:
    """``contraseg pretrain-global``: stage 1."""

    data: DataConfig = option(help="dataset and preprocessing", factory=DataConfig)
    model: ModelConfig = option(help="network", factory=ModelConfig)
    loss: GlobalLossConfig = option(help="global contrastive loss", factory=GlobalLossConfig)
    optim: OptimConfig = option(help="optimiser and loop", factory=OptimConfig)
    augment: PretrainAugmentConfig = option(
        help="augmentation of the two views", factory=PretrainAugmentConfig
    )
    seed: int = option(0, **_SEED)


@dataclass
class PretrainLocalRun:
    """``contraseg pretrain-local``: stage 2."""

    data: DataConfig = option(help="dataset and preprocessing", factory=DataConfig)
    model: ModelConfig = option(help="network", factory=ModelConfig)
    loss: LocalLossConfig = option(help="local contrastive loss", factory=LocalLossConfig)
    optim: OptimConfig = option(help="optimiser and loop", factory=OptimConfig)
    augment: LocalAugmentConfig = option(
        help="augmentation of the two views", factory=LocalAugmentConfig
    )
    encoder: str = option(
        "", help="run directory of pretrain-global whose encoder is loaded and frozen", path=True
    )
    seed: int = option(0, **_SEED)

    def check(self) -> None:
        if not self.encoder:
            raise InputError("encoder", "required: the pretrain-global run directory to build on")
        if self.loss.views == "aligned":
            base = LocalAugmentConfig()
            for key in ("view_crop_fraction", "view_flip_prob"):
                if getattr(self.augment, key) != getattr(base, key):
                    raise InputError(f"augment.{key}", "applies only to loss.views=transformed")


@dataclass
class FinetuneRun:
    """``contraseg finetune``: stage 3."""

    data: DataConfig = option(help="dataset and preprocessing", factory=DataConfig)
    model: ModelConfig = option(help="network", factory=ModelConfig)
    finetune: FinetuneConfig = option(
        help="labelled set and initialisation", factory=FinetuneConfig
    )
    optim: OptimConfig = option(
        help="optimiser and loop", factory=lambda: OptimConfig(batch_size=20)
    )
    augment: FinetuneAugmentConfig = option(
        help="augmentation of labelled slices", factory=FinetuneAugmentConfig
    )
    seed: int = option(0, **_SEED)

    def check(self) -> None:
        ft = self.finetune
        if ft.train is not None and ft.val is None:
            raise InputError(
                "finetune.val",
                "required with finetune.train: the validation cases (val=[] trains without "
                "validation and keeps the last weights)",
            )
        if ft.val is not None and ft.train is None:
            raise InputError("finetune.train", "required with finetune.val: the training cases")
        if ft.train is not None and (not ft.train or set(ft.train) & set(ft.val or [])):
            raise InputError(
                "finetune.train", "must name at least one case, none of them a validation case"
            )
        if ft.init != "random" and not ft.pretrained:
            raise InputError(
                "finetune.pretrained",
                f"required with finetune.init={ft.init}: the pre-training run directory",
            )


RUN_CLASSES: dict[str, type] = {
    "prepare": PrepareRun,
    "pretrain-global": PretrainGlobalRun,
    "pretrain-local": PretrainLocalRun,
    "finetune": FinetuneRun,
}


# ---------------------------------------------------------------------------------------------
# Loading, validating, overriding, saving

C = TypeVar("C")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check ``value`` against the annotation ``tp``; convert int to float where float is asked."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option_tp in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option_tp, key, source)
            except InputError as err:
                errors.append(err.problem)
        raise InputError(source, errors[0] if errors else f"'{key}' may not be null")
    if origin is Literal:
        if value not in get_args(tp) or isinstance(value, bool) != any(
            isinstance(a, bool) for a in get_args(tp)
        ):
            raise InputError(source, f"'{key}' must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list | tuple):
            raise InputError(source, f"'{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise InputError(source, f"'{key}' must be a mapping, got {value!r}")
        return from_dict(tp, value, source, prefix=f"{key}.")  # type: ignore[arg-type]
    if tp is float and isinstance(value, int | str) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except (ValueError, OverflowError):
            pass
    if tp in (int, float) and isinstance(value, bool):
        raise InputError(source, f"'{key}' must be {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise InputError(source, f"'{key}' must be {_type_name(tp)}, got {value!r}")
    return value


def _fields(cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))  # type: ignore[arg-type]


def _rule(f: dataclasses.Field) -> Rule:
    return f.metadata.get("rule", Rule())


def _suggest(cls: type, key: str, prefix: str = "") -> str:
    """' (did you mean ...?)' for a misspelt key, or for a key that lives in a section."""
    names = [f.name for f in _fields(cls)]
    close = difflib.get_close_matches(str(key), names, n=1)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    hints = typing.get_type_hints(cls)
    for name in names:
        if dataclasses.is_dataclass(hints[name]) and key in {f.name for f in _fields(hints[name])}:
            return f" (did you mean '{prefix}{name}.{key}'?)"
    return ""


def from_dict(cls: type[C], values: dict[str, Any], source: str | None, prefix: str = "") -> C:
    """``cls`` from nested ``values`` over its defaults: unknown keys suggest the right one,
    values are type-checked; rules are checked separately (:func:`validate`)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in _fields(cls)}
    for key in values:
        if key not in fields:
            hint = _suggest(cls, key, prefix)
            raise InputError(source, f"unknown config key '{prefix}{key}'{hint}")
    base = cls()
    kwargs = {}
    for name, f in fields.items():
        if name not in values:
            continue
        value = values[name]
        current = getattr(base, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = {**dataclasses.asdict(current), **value}  # type: ignore[call-overload]
        axes = _rule(f).axes
        if axes and isinstance(value, int | float) and not isinstance(value, bool):
            value = [value] * axes  # a scalar where a list means "the same on every axis"
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}", source)
    return dataclasses.replace(base, **kwargs)  # type: ignore[type-var]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _check_number(value: float, rule: Rule, key: str, source: str | None) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(source, f"'{key}' must be a finite number, got {value}")
    if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        raise InputError(source, f"'{key}' must fit a 64-bit integer, got {value}")
    low_ok = rule.low is None or (value > rule.low if rule.low_open else value >= rule.low)
    high_ok = rule.high is None or value <= rule.high
    if not (low_ok and high_ok):
        low = "-inf" if rule.low is None else _number(rule.low)
        bracket = "(" if rule.low_open else "["
        high = "inf" if rule.high is None else _number(rule.high)
        raise InputError(source, f"'{key}' must lie in {bracket}{low}, {high}], got {value}")
    if rule.multiple_of and value % rule.multiple_of:
        raise InputError(source, f"'{key}' must be a multiple of {rule.multiple_of}, got {value}")


def _check_value(value: Any, rule: Rule, key: str, source: str | None) -> None:
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, list):
        if rule.length and not rule.length[0] <= len(value) <= rule.length[1]:
            lo, hi = rule.length
            count = f"{lo}" if lo == hi else f"{lo} to {hi}"
            raise InputError(source, f"'{key}' needs {count} values, got {value}")
        if rule.unique and len(set(value)) != len(value):
            raise InputError(source, f"'{key}' has repeated values: {value}")
        for i, item in enumerate(value):
            _check_value(item, rule, f"{key}[{i}]", source)
        strict = rule.ordered == "increasing"
        for a, b in itertools.pairwise(value):
            if rule.ordered and (a >= b if strict else a > b):
                order = "increasing" if strict else "in order (low <= high)"
                raise InputError(source, f"'{key}' must be {order}, got {value}")
        return
    _check_number(value, rule, key, source)


def validate(config: Any, source: str | None = None, prefix: str = "") -> None:
    """Check every field of ``config`` (recursively) against its :class:`Rule`, then the
    cross-field ``check()`` of each section; the first violation is an :class:`InputError`
    naming the key. Keys of another dataset's reader must keep their defaults."""
    dataset = getattr(getattr(config, "data", None), "dataset", None) or getattr(
        config, "dataset", None
    )
    base = type(config)()
    for f in _fields(type(config)):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, source, prefix=f"{key}.")
            continue
        rule = _rule(f)
        _check_value(value, rule, key, source)
        if rule.path and isinstance(value, str) and "\0" in value:
            raise InputError(source, f"'{key}' holds a NUL character")
        if rule.readers and dataset not in rule.readers and value != getattr(base, f.name):
            raise InputError(
                source,
                f"'{key}' applies only to data.dataset {', '.join(rule.readers)}, not {dataset}",
            )
    check = getattr(config, "check", None)
    if check is not None:
        try:
            check()
        except InputError as err:
            raise InputError(source, f"'{prefix}{err.path}': {err.problem}") from None


def absolute_paths(config: C) -> C:
    """A copy of ``config`` whose path fields are absolute (relative ones are taken from the
    working directory now), so that a saved config works from any directory."""
    changes: dict[str, Any] = {}
    for f in _fields(type(config)):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = absolute_paths(value)
        elif _rule(f).path and isinstance(value, str) and value:
            changes[f.name] = os.path.abspath(os.path.expanduser(value))
    return dataclasses.replace(config, **changes)  # type: ignore[type-var]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise InputError(None, f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=3e-4", "loss.strategy=GR"]`` -> a nested dict; values parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(None, f"override '{item}' is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, section by section (a later layer wins key by key)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML file (safe loader); any problem is one line naming the file."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read config: {getattr(err, 'strerror', err)}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InputError(path, f"not valid YAML: {str(err).splitlines()[0]}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise InputError(path, "a config file must hold a mapping of sections")
    return loaded or {}


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    sections: tuple[str, ...] | None = None,
) -> C:
    """Defaults of ``cls``, then the YAML file at ``path``, then the ``key=value`` overrides;
    validated, with absolute paths. ``sections`` keeps only those sections of the file (so that
    ``prepare`` can take the data section of a training config)."""
    values: dict[str, Any] = {}
    source = None
    if path is not None:
        source = str(path)
        values = read_yaml(path)
        if sections is not None:
            values = {k: v for k, v in values.items() if k in sections}
    if overrides:
        values = deep_merge(values, parse_overrides(overrides))
        source = source or "command line"
    config = from_dict(cls, values, source)
    validate(config, source)
    return absolute_paths(config)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as nested dicts, without the keys that its dataset's reader does not use."""
    dataset = getattr(getattr(config, "data", None), "dataset", None) or getattr(
        config, "dataset", None
    )
    out: dict[str, Any] = {}
    for f in _fields(type(config)):
        value = getattr(config, f.name)
        readers = _rule(f).readers
        if readers and dataset not in readers:
            continue
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def save_config(config: Any, path: str | Path) -> None:
    fileio.write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) of every field of ``cls``, sections flattened with dots."""
    hints = typing.get_type_hints(cls)
    rows = []
    base = cls()
    for f in _fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, f"{key}.")  # type: ignore[arg-type]
            continue
        help_text = f.metadata.get("help", "")
        readers = _rule(f).readers
        if readers:
            help_text += f" [{', '.join(readers)} only]"
        rows.append((key, _type_name(tp), getattr(base, f.name), help_text))
    return rows


# ---------------------------------------------------------------------------------------------
# Baselines and extensions of the paper (docs/extensions.md): joint pre-training of encoder and
# decoder (supplement 3.4, Table 7) and the pretext-task initialisations (rotation, inpainting,
# context restoration). Mixup and self-training are FinetuneConfig fields.


@dataclass
class PretrainJointRun:
    """``contraseg pretrain-joint``: e, d_l, g1 and g2 in one stage, L = L_g + lambda * L_l."""

    data: DataConfig = option(help="dataset and preprocessing", factory=DataConfig)
    model: ModelConfig = option(help="network", factory=ModelConfig)
    global_loss: GlobalLossConfig = option(
        help="global contrastive loss and its batch (as pretrain-global's loss)",
        factory=GlobalLossConfig,
    )
    local_loss: LocalLossConfig = option(
        help="local contrastive loss and its batch (as pretrain-local's loss)",
        factory=LocalLossConfig,
    )
    lambda_local: float = option(
        1.0,
        help="weight of the local loss, L = L_g + lambda * L_l (supplement Table 7: 1, 10, "
        "100, 1000)",
        low=0.0,
        high=1e6,
    )
    optim: OptimConfig = option(help="optimiser and loop", factory=OptimConfig)
    augment: PretrainAugmentConfig = option(
        help="augmentation of the two views", factory=PretrainAugmentConfig
    )
    seed: int = option(0, **_SEED)

    def check(self) -> None:
        defaults = LocalLossConfig()
        for key in ("views", "encoder_bn"):
            if getattr(self.local_loss, key) != getattr(defaults, key):
                raise InputError(
                    f"local_loss.{key}",
                    "applies only to pretrain-local: joint training trains the encoder and "
                    "uses aligned views",
                )


PretextTask = Literal["rotation", "inpainting", "context_restoration"]
# the keys of the pretext section each task reads (the others must keep their defaults)
PRETEXT_KEYS: dict[str, tuple[str, ...]] = {
    "rotation": (),
    "inpainting": ("boxes", "box_fraction", "decoder_blocks"),
    "context_restoration": ("swaps", "patch_fraction", "decoder_blocks"),
}


@dataclass
class PretextConfig:
    """The pretext task and its corruption (docs/extensions.md)."""

    task: PretextTask = option(
        "rotation",
        help="rotation: predict 0/90/180/270 degrees (encoder); inpainting: restore zeroed "
        "boxes; context_restoration: restore swapped patches (encoder + decoder)",
    )
    augment: bool = option(
        True, help="crop-and-resize and brightness/contrast (the augment section) before the task"
    )
    boxes: int = option(1, help="inpainting: boxes zeroed per image", low=1, high=64)
    box_fraction: list[float] = option(
        help="inpainting: range of a box's side as a fraction of the image side "
        "(official: 30 to 90 of 192 px)",
        factory=lambda: [0.15625, 0.46875],
        low=0.0,
        low_open=True,
        high=1.0,
        length=(2, 2),
        ordered="non-decreasing",
    )
    swaps: int = option(
        10, help="context restoration: pairs of patches swapped per image", low=1, high=4096
    )
    patch_fraction: float = option(
        0.026,
        help="context restoration: patch side as a fraction of the image side (official: 5 "
        "of 192 px; at least 1 px)",
        low=0.0,
        low_open=True,
        high=0.5,
    )
    decoder_blocks: int = option(
        5,
        help="inpainting, context restoration: decoder blocks d_1..d_l kept in the product "
        "(all five are trained to reconstruct)",
        low=1,
        high=5,
    )

    def check(self) -> None:
        base = PretextConfig()
        for key in ("boxes", "box_fraction", "swaps", "patch_fraction", "decoder_blocks"):
            if key not in PRETEXT_KEYS[self.task] and getattr(self, key) != getattr(base, key):
                used = [task for task, keys in PRETEXT_KEYS.items() if key in keys]
                raise InputError(key, f"applies only to pretext.task {' and '.join(used)}")


@dataclass
class PretrainPretextRun:
    """``contraseg pretrain-pretext``: a pretext-task initialisation (baseline)."""

    data: DataConfig = option(help="dataset and preprocessing", factory=DataConfig)
    model: ModelConfig = option(help="network", factory=ModelConfig)
    pretext: PretextConfig = option(help="pretext task", factory=PretextConfig)
    optim: OptimConfig = option(help="optimiser and loop", factory=OptimConfig)
    augment: PretrainAugmentConfig = option(
        help="augmentation before the pretext transform", factory=PretrainAugmentConfig
    )
    seed: int = option(0, **_SEED)


RUN_CLASSES.update({"pretrain-joint": PretrainJointRun, "pretrain-pretext": PretrainPretextRun})
__all__ += ["PretextConfig", "PretrainJointRun", "PretrainPretextRun"]
