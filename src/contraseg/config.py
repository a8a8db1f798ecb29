"""Typed run configurations: dataclasses, strict YAML loading, ``key=value`` overrides.

Every command reads one of the ``*Run`` dataclasses below. A YAML file and command-line
overrides are merged onto the defaults; an unknown or misspelt key is an :class:`InputError`
that names the key and suggests the closest valid one, a value of the wrong type names the key
and the expected type. The resolved config is written as ``config.yaml`` in every run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from contraseg import fileio
from contraseg.errors import InputError

# ---------------------------------------------------------------------------------------------
# Sections shared by several stages


@dataclass
class DataConfig:
    """Which dataset, where, and how it is preprocessed (see ``contraseg.data.preprocess``)."""

    dataset: Literal["acdc", "phantom", "prostate", "mmwhs", "nnunet", "cityscapes"] = "phantom"
    root: str = "data/phantom"
    cache: str = ""  # empty: <root>/.contraseg-cache
    target_spacing: list[float] | None = None  # in-plane mm; None: the reader's default
    size: list[int] | None = None  # in-plane crop/pad size; None: the reader's default
    n4: bool = False  # N4 bias correction (the paper's setting; slow, cached)
    percentiles: list[float] = field(default_factory=lambda: [1.0, 99.0])
    frames: list[str] = field(default_factory=lambda: ["ED"])  # ACDC: ED, ES or both
    channel: int | None = 0  # which channel of a 4-D image (MSD prostate: 0 = T2)
    split_seed: int = 0  # for datasets whose split is generated (phantom, nnU-Net)


@dataclass
class ModelConfig:
    """UNet and heads (method_spec section 2). ``num_classes``/``in_channels`` 0: from data."""

    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 128, 128])
    in_channels: int = 0
    num_classes: int = 0
    g1_hidden: int = 1024
    g1_out: int = 128
    g2_out: int = 128  # dimension of a local region embedding after the shared dense layer
    g2_project: bool = True  # the official ``wgt_en``: flatten KxK regions, shared dense -> g2_out


@dataclass
class OptimConfig:
    iterations: int = 10000
    lr: float = 1e-3
    batch_size: int = 12
    checkpoint_every: int = 500
    log_every: int = 10


@dataclass
class PretrainAugmentConfig:
    """Per-image random crop-and-resize and brightness/contrast (method_spec 3.3)."""

    crop_fraction: list[float] = field(default_factory=lambda: [0.5, 0.6])  # side of the crop
    brightness: float = 0.3
    contrast: list[float] = field(default_factory=lambda: [0.7, 1.3])
    clip: list[float] = field(default_factory=lambda: [0.0, 1.5])


@dataclass
class FinetuneAugmentConfig:
    """Geometric augmentation of image and label together (method_spec 6.2)."""

    enabled: bool = True
    rotation_deg: float = 15.0
    scale: list[float] = field(default_factory=lambda: [0.95, 1.05])
    flip_prob: float = 0.5
    rot45: bool = True
    elastic_sigma_px: float = 5.0
    elastic_grid: int = 3
    elastic_prob: float = 0.5


# ---------------------------------------------------------------------------------------------
# Stage-specific sections


@dataclass
class GlobalLossConfig:
    strategy: Literal["GR", "GD-", "GD"] = "GD"
    partitions: int = 4  # S
    volumes_per_batch: int = 3  # m; the batch holds m * S images, two views each
    temperature: float = 0.1


@dataclass
class LocalLossConfig:
    strategy: Literal["LR", "LD"] = "LR"
    decoder_blocks: int = 3  # l
    region_size: Literal[1, 3] = 3  # K
    negatives: Literal["official", "all"] = "official"  # 13-region grid, 5 neighbours, or all
    partitions: int = 4
    volumes_per_batch: int = 3  # L^D: m volumes x S partitions
    temperature: float = 0.1


@dataclass
class FinetuneConfig:
    labelled_volumes: Literal[1, 2, 8] = 1
    combination: str = "c1"
    init: Literal["random", "encoder", "encoder+decoder"] = "random"
    pretrained: str = ""  # run directory of pretrain-global (encoder) or pretrain-local
    loss: Literal["dice", "dice_fg", "ce", "dice_ce"] = "dice"
    val_every: int = 50


# ---------------------------------------------------------------------------------------------
# One dataclass per command


@dataclass
class PretrainGlobalRun:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: GlobalLossConfig = field(default_factory=GlobalLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: PretrainAugmentConfig = field(default_factory=PretrainAugmentConfig)
    seed: int = 0


@dataclass
class PretrainLocalRun:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LocalLossConfig = field(default_factory=LocalLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: PretrainAugmentConfig = field(default_factory=PretrainAugmentConfig)
    encoder: str = ""  # run directory of pretrain-global whose encoder is loaded and frozen
    seed: int = 0


@dataclass
class FinetuneRun:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(batch_size=20))
    augment: FinetuneAugmentConfig = field(default_factory=FinetuneAugmentConfig)
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Loading, overriding, saving

C = TypeVar("C")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check ``value`` against the annotation ``tp``; convert int to float where float is asked."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key, source)
            except InputError as err:
                errors.append(err.problem)
        raise InputError(source, errors[0] if errors else f"'{key}' may not be null")
    if origin is Literal:
        if value not in get_args(tp):
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
        return _from_dict(tp, value, source, prefix=f"{key}.")
    if tp is float and isinstance(value, int | str) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool):
        raise InputError(source, f"'{key}' must be {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise InputError(source, f"'{key}' must be {_type_name(tp)}, got {value!r}")
    return value


def _from_dict(cls: type[C], values: dict[str, Any], source: str | None, prefix: str = "") -> C:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise InputError(source, f"unknown config key '{prefix}{key}'{hint}")
    base = cls()
    kwargs = {}
    for name in names:
        if name not in values:
            continue
        current = getattr(base, name)
        if dataclasses.is_dataclass(current) and isinstance(values[name], dict):
            merged = {**dataclasses.asdict(current), **values[name]}
            kwargs[name] = _coerce(merged, hints[name], f"{prefix}{name}", source)
        else:
            kwargs[name] = _coerce(values[name], hints[name], f"{prefix}{name}", source)
    return dataclasses.replace(base, **kwargs)  # type: ignore[type-var]


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


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None
) -> C:
    """Defaults of ``cls``, then the YAML file at ``path``, then the ``key=value`` overrides."""
    values: dict[str, Any] = {}
    source = None
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise InputError(path, f"cannot read config: {err.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise InputError(path, f"not valid YAML: {str(err).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise InputError(path, "a config file must hold a mapping of sections")
        values = loaded or {}
    if overrides:
        values = _deep_merge(values, parse_overrides(overrides))
        source = source or "command line"
    return _from_dict(cls, values, source)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    fileio.write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
