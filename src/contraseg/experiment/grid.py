"""Experiment grids: every run a table needs, named by one typed YAML file (docs/experiments.md).

A grid names the dataset (``data``, ``model``), the settings shared by every run of each stage
(``pretrain_global``, ``pretrain_local``, ``pretrain_joint``, ``pretrain_pretext``,
``finetune``: the keys of the stage commands), the initialisations (each random, or a
pre-training variant: stage 1 with an optional stage 2 on top of it, a joint run or a pretext
run; each optionally with fine-tuning keys of its own), the numbers of labelled volumes, the
labelled sets and the seeds. It is loaded like a run config:
defaults, then one or more YAML files merged in order, then ``key=value`` overrides; an unknown
key is an :class:`InputError` that names the file and suggests the closest key, and every value
is checked against its rule before anything runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from contraseg import fileio

# a grid is read and checked exactly as a run config is (suggestions for misspelt keys, typed
# values), by the same loader's parts
from contraseg.config import (
    SEED_MAX,
    DataConfig,
    FinetuneRun,
    ModelConfig,
    PretextConfig,
    PretrainGlobalRun,
    PretrainJointRun,
    PretrainLocalRun,
    PretrainPretextRun,
    absolute_paths,
    deep_merge,
    from_dict,
    option,
    parse_overrides,
    read_yaml,
    to_dict,
    validate,
)
from contraseg.data.phantom import Preset
from contraseg.errors import InputError

__all__ = [
    "PRETRAINING",
    "STAGES",
    "Grid",
    "InitSpec",
    "PhantomSpec",
    "grid_text",
    "load_grid",
    "stage_config",
]

# grid section -> (command, run config class)
STAGES: dict[str, tuple[str, type]] = {
    "pretrain_global": ("pretrain-global", PretrainGlobalRun),
    "pretrain_joint": ("pretrain-joint", PretrainJointRun),
    "pretrain_pretext": ("pretrain-pretext", PretrainPretextRun),
    "pretrain_local": ("pretrain-local", PretrainLocalRun),
    "finetune": ("finetune", FinetuneRun),
}
PRETRAINING = tuple(section for section in STAGES if section != "finetune")
# what fine-tuning loads by default from the product of each first pre-training stage
STARTS = ("pretrain_global", "pretrain_joint", "pretrain_pretext")
# keys a stage section (or an initialisation) may not set: the grid sets them for every run
SET_BY_GRID: dict[str, dict[str, str]] = {
    "pretrain_global": {},
    "pretrain_joint": {},
    "pretrain_pretext": {},
    "pretrain_local": {"encoder": "the stage-1 run of the initialisation"},
    "finetune": {
        "seed": "seeds",
        "finetune.labelled_volumes": "labelled_volumes",
        "finetune.combination": "combinations",
        "finetune.train": "labelled_volumes and combinations",
        "finetune.val": "labelled_volumes and combinations",
        "finetune.init": "initialisations",
        "finetune.pretrained": "initialisations",
    },
}
SHARED = {
    "data": "the grid's top-level data section",
    "model.widths": "the grid's top-level model section",
    "model.in_channels": "the grid's top-level model section",
    "model.num_classes": "the grid's top-level model section",
}


@dataclass
class PhantomSpec:
    """The generated phantom a grid runs on (``contraseg phantom``), written when missing."""

    volumes: int = option(60, help="volumes to generate", low=6, high=999)
    size: int = option(96, help="in-plane size of the generated images in pixels", low=16, high=512)
    seed: int = option(0, help="dataset seed", low=0, high=SEED_MAX)
    preset: Preset = option(
        "paper", help="difficulty: paper (the paper's one-volume regime) or easy (docs/data.md)"
    )


@dataclass
class InitSpec:
    """One initialisation of fine-tuning: random, a stage-1 run (with a stage-2 run on it), a
    joint run or a pretext run; optionally with fine-tuning keys of its own."""

    name: str = option("", help="its name in tables and figures, e.g. 'G^D + L^D'")
    pretrain_global: dict | None = option(
        None, help="pretrain-global keys of its stage-1 run ({}: the section's); null: none"
    )
    pretrain_local: dict | None = option(
        None, help="pretrain-local keys of its stage-2 run on that encoder; null: none"
    )
    pretrain_joint: dict | None = option(
        None, help="pretrain-joint keys of its joint run (instead of pretrain_global); null: none"
    )
    pretrain_pretext: dict | None = option(
        None,
        help="pretrain-pretext keys of its pretext run (instead of pretrain_global); null: none",
    )
    load: Literal["encoder", "encoder+decoder"] | None = option(
        None,
        help="what fine-tuning loads from the pre-training; null: all it trained (encoder for "
        "pretrain_global and rotation, encoder+decoder for the others)",
    )
    finetune: dict = option(
        help="finetune keys of its fine-tuning runs, merged over the finetune section "
        "(e.g. {finetune: {mixup_alpha: 0.1}})",
        factory=dict,
    )

    def start(self) -> str:
        """The section of its first pre-training stage; '' for random initialisation."""
        return next((s for s in STARTS if getattr(self, s) is not None), "")


@dataclass
class Grid:
    """A grid of runs (docs/experiments.md)."""

    title: str = option("", help="heading of table.md and report.html")
    description: str = option("", help="a paragraph under the heading")
    data: DataConfig = option(help="dataset and preprocessing of every run", factory=DataConfig)
    model: ModelConfig = option(help="network of every run", factory=ModelConfig)
    phantom: PhantomSpec | None = option(
        None, help="generate the phantom into data.root (default OUT/data/phantom) when missing"
    )
    pretrain_global: dict = option(
        help="keys of every pretrain-global run (contraseg config show pretrain-global)",
        factory=dict,
    )
    pretrain_local: dict = option(
        help="keys of every pretrain-local run (contraseg config show pretrain-local)",
        factory=dict,
    )
    pretrain_joint: dict = option(
        help="keys of every pretrain-joint run (contraseg config show pretrain-joint)",
        factory=dict,
    )
    pretrain_pretext: dict = option(
        help="keys of every pretrain-pretext run (contraseg config show pretrain-pretext)",
        factory=dict,
    )
    finetune: dict = option(
        help="keys of every finetune run (contraseg config show finetune)", factory=dict
    )
    initialisations: list[InitSpec] = option(
        help="the initialisations compared", factory=list, length=(1, 1000)
    )
    baseline: str = option(
        "random", help="initialisation the others are compared with; '': no comparison"
    )
    labelled_volumes: list[Literal[1, 2, 8, "all"]] = option(
        help="numbers of labelled volumes; all: the split's benchmark set",
        factory=lambda: [1, 2],
        length=(1, 4),
        unique=True,
    )
    combinations: list[str] | Literal["all"] = option(
        "all", help="labelled sets of each size (c1, c2, ...); all: every one the split has"
    )
    seeds: list[int] = option(
        help="fine-tuning seeds (every labelled set with each)",
        factory=lambda: [0],
        low=0,
        high=SEED_MAX,
        length=(1, 1000),
        unique=True,
    )

    def check(self) -> None:
        names = [init.name for init in self.initialisations]
        for i, init in enumerate(self.initialisations):
            if not init.name.strip():
                raise InputError(f"initialisations[{i}].name", "must name the initialisation")
            if names.index(init.name) != i:
                raise InputError(f"initialisations[{i}].name", f"'{init.name}' is named twice")
            starts = [s for s in STARTS if getattr(init, s) is not None]
            if len(starts) > 1:
                raise InputError(
                    f"initialisations[{i}]",
                    f"give one of {', '.join(STARTS)}, not {' and '.join(starts)}",
                )
            if init.pretrain_local is not None and init.pretrain_global is None:
                raise InputError(
                    f"initialisations[{i}].pretrain_local",
                    "needs pretrain_global: the encoder that stage 2 builds on",
                )
            if init.load is not None and not starts:
                raise InputError(
                    f"initialisations[{i}].load", "random initialisation loads nothing"
                )
        if self.baseline and self.baseline not in names:
            raise InputError(
                "baseline", f"'{self.baseline}' is not an initialisation ({', '.join(names)})"
            )
        if self.phantom is not None and self.data.dataset != "phantom":
            raise InputError(
                "phantom", f"applies only to data.dataset phantom, not {self.data.dataset}"
            )
        if self.combinations != "all" and (
            not self.combinations or len(set(self.combinations)) != len(self.combinations)
        ):
            raise InputError("combinations", f"must name distinct sets, got {self.combinations}")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"strategy": "GD"}}`` -> ``{"loss.strategy": "GD"}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_layer(section: str, layer: dict[str, Any], where: str, source: str) -> None:
    """Keys and types of one layer of a stage config (a stage section or an initialisation's
    variant), without the values the grid sets itself."""
    forbidden = {**SHARED, **SET_BY_GRID[section]}
    for key in _flat(layer):
        for refused, owner in forbidden.items():
            if key == refused or key.startswith(f"{refused}."):
                raise InputError(source, f"'{where}.{key}' is set by {owner}")
    from_dict(STAGES[section][1], layer, source, prefix=f"{where}.")


def stage_config(grid: Grid, section: str, *layers: dict[str, Any], source: str) -> Any:
    """The run config of one stage: defaults, the grid's data and model, the grid's stage
    section, then ``layers`` in order; validated (a violation names ``source``)."""
    values: dict[str, Any] = {
        "data": dataclasses.asdict(grid.data),
        "model": dataclasses.asdict(grid.model),
    }
    for layer in (getattr(grid, section), *layers):
        values = deep_merge(values, layer)
    config = from_dict(STAGES[section][1], values, source)
    validate(config, source)
    return absolute_paths(config)


def load_grid(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> Grid:
    """The grid of the YAML files ``paths`` (later files merged over earlier ones, mappings
    key by key, lists replaced) and ``key=value`` overrides, checked as a whole.

    With ``phantom`` and no ``data.root``, the root is left empty: the experiment puts the
    phantom into its output folder.
    """
    if not paths:
        raise InputError("--config", "give the grid's YAML file")
    values: dict[str, Any] = {}
    for path in paths:
        values = deep_merge(values, read_yaml(path))
    if overrides:
        values = deep_merge(values, parse_overrides(list(overrides)))
    source = " + ".join(str(p) for p in paths) + (" + command line" if overrides else "")
    if values.get("phantom") is not None and "root" not in (values.get("data") or {}):
        values = deep_merge(values, {"data": {"root": ""}})
    grid = from_dict(Grid, values, source)
    validate(grid, source)
    for section in STAGES:
        _check_layer(section, getattr(grid, section), section, source)
    for i, init in enumerate(grid.initialisations):
        for section in STAGES:
            layer = getattr(init, section)
            if layer is not None:
                _check_layer(section, layer, f"initialisations[{i}].{section}", source)
        if init.load == "encoder+decoder" and not has_decoder(grid, init):
            raise InputError(
                source,
                f"'initialisations[{i}].load': encoder+decoder needs a pre-training that trains "
                "decoder blocks (pretrain_local, pretrain_joint, or pretrain_pretext with task "
                "inpainting or context_restoration)",
            )
    return absolute_paths(grid)


def has_decoder(grid: Grid, init: InitSpec) -> bool:
    """Whether the product of the initialisation's pre-training holds decoder blocks."""
    if init.pretrain_pretext is not None:
        merged = deep_merge(grid.pretrain_pretext, init.pretrain_pretext)
        return merged.get("pretext", {}).get("task", PretextConfig().task) != "rotation"
    return init.pretrain_local is not None or init.pretrain_joint is not None


def finetune_init(grid: Grid, init: InitSpec) -> str:
    """``finetune.init`` of the initialisation's fine-tuning runs."""
    if not init.start():
        return "random"
    return init.load or ("encoder+decoder" if has_decoder(grid, init) else "encoder")


def grid_text(grid: Grid) -> str:
    """The resolved grid as YAML, for the record (``OUT/grid.yaml``); it loads back."""
    values = dataclasses.asdict(grid)
    values["data"] = to_dict(grid.data)
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def save_grid(grid: Grid, path: Path) -> None:
    fileio.write_text(path, grid_text(grid))
