"""A grid expanded into its runs: what each is, what it needs, where it lives, whether it is done.

Each pre-training variant is one run, shared by every fine-tuning run that uses it; runs are
identified by their resolved config. Directory names are derived from what makes a run
different, so that they are readable and stay the same when a grid grows (docs/experiments.md):

    pretrain-global/GD-m31           stage 1: the strategy, then the variant's own keys
    pretrain-local/GD+LD-d1-K1       stage 2: its encoder's name + its strategy and keys
    pretrain-joint/GD+LD-lambda10    joint: both strategies, then the variant's own keys
    pretrain-pretext/inpainting-d3   pretext: the task, then the variant's own keys
    finetune/GD+LD/1vol-c1-s0        stage 3: the initialisation's pre-training, set, seed
    finetune/joint-GD+LD-lambda10-enc+mixup0.1/2vol-c3-s1
                                     a joint run's encoder only, with fine-tuning keys
    finetune/random/all-s0           the benchmark set (labelled_volumes: all)
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contraseg.config import load_config
from contraseg.data.splits import Split
from contraseg.errors import InputError
from contraseg.experiment.grid import (
    PRETRAINING,
    STAGES,
    Grid,
    InitSpec,
    _flat,
    finetune_init,
    has_decoder,
    stage_config,
)
from contraseg.report.stats import ALL, labelled_order

__all__ = [
    "LEVELS",
    "Plan",
    "Run",
    "expand",
    "run_state",
]

# run folders and levels, in the order they run: a level needs only the levels before it
LEVELS = tuple(STAGES[section][0] for section in STAGES)
BENCHMARK = "benchmark"  # the combination column of a run on the benchmark set

# short names of the keys that usually tell pre-training variants apart
ABBREVIATIONS = {
    "loss.volumes_per_batch": "m",
    "loss.partitions": "S",
    "loss.temperature": "tau",
    "loss.decoder_blocks": "d",
    "loss.region_size": "K",
    "loss.negatives": "neg",
    "optim.batch_size": "b",
    "optim.iterations": "it",
    "optim.lr": "lr",
    "seed": "seed",
    # pretrain-joint
    "lambda_local": "lambda",
    "global_loss.volumes_per_batch": "m",
    "global_loss.partitions": "S",
    "global_loss.temperature": "tau",
    "local_loss.decoder_blocks": "d",
    "local_loss.region_size": "K",
    "local_loss.negatives": "neg",
    # pretrain-pretext
    "pretext.decoder_blocks": "d",
    # fine-tuning keys of an initialisation
    "finetune.mixup_alpha": "mixup",
    "finetune.self_training_rounds": "self",
    "finetune.pseudo_threshold": "thr",
    "finetune.pseudo_fraction": "pseudo",
}
# keys that a pre-training run's name starts with rather than lists
NAMED_BY = ("loss.strategy", "global_loss.strategy", "local_loss.strategy", "pretext.task")
TIME_FILE = "wall_time.json"  # seconds this run took, kept across resumptions


@dataclass(frozen=True)
class Run:
    """One run of the grid. ``name`` is its folder under the experiment's output folder."""

    name: str
    stage: str  # one of LEVELS
    config: Any
    needs: tuple[str, ...] = ()
    # fine-tuning runs only
    init: str = ""
    labelled_volumes: int | str = 0
    combination: str = ""
    seed: int = 0
    keys: dict[str, Any] = field(default_factory=dict)  # grid keys for results.csv

    @property
    def level(self) -> int:
        return LEVELS.index(self.stage)

    @property
    def iterations(self) -> int:
        """Training iterations; a self-training run trains once per round."""
        rounds = self.config.finetune.self_training_rounds if self.stage == "finetune" else 0
        return int(self.config.optim.iterations) * (1 + rounds)


@dataclass(frozen=True)
class Plan:
    """Every run of a grid in execution order: stage 1, stage 2, then fine-tuning ordered by
    seed, number of labelled volumes, labelled set and initialisation (so that a grid stopped
    early has complete pairs)."""

    grid: Grid
    out: Path
    split: Split
    runs: tuple[Run, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {run.name: run for run in self.runs})

    def run(self, name: str) -> Run:
        by_name: dict[str, Run] = self._by_name  # type: ignore[attr-defined]
        if name not in by_name:
            raise InputError("--run", f"the grid has no run '{name}'")
        return by_name[name]

    def level(self, stage: str) -> list[Run]:
        return [run for run in self.runs if run.stage == stage]

    def dependents(self, name: str) -> list[Run]:
        """Runs that need ``name``, directly or through another run."""
        found: list[Run] = []
        frontier = {name}
        for run in self.runs:
            if frontier & set(run.needs):
                found.append(run)
                frontier.add(run.name)
        return found


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return "x".join(_value_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _key_parts(layer: dict[str, Any]) -> list[str]:
    """``m31`` for each key of a variant (``name-value`` without a short name), in key order,
    leaving out the keys in the run's label (:data:`NAMED_BY`)."""
    parts = []
    for key, value in sorted(_flat(layer).items()):
        if key in NAMED_BY:
            continue
        short = ABBREVIATIONS.get(key)
        parts.append(
            f"{short}{_value_text(value)}"
            if short
            else f"{key.split('.')[-1]}-{_value_text(value)}"
        )
    return parts


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", name)


def variant_name(label: str, layer: dict[str, Any]) -> str:
    """``GD`` + ``-m31`` for each key of the variant besides those the label names, in key
    order."""
    return _safe("-".join([label, *_key_parts(layer)]))


def _combinations(grid: Grid, split: Split, count: int | str) -> list[str]:
    if count == ALL:
        if split.benchmark is None:
            raise InputError(
                "labelled_volumes", f"'all' needs a benchmark set; {split.source} has none"
            )
        return [BENCHMARK]
    available = split.combinations(int(count))
    if grid.combinations == "all":
        if not available:
            raise InputError(
                "labelled_volumes", f"{split.source} has no labelled sets of {count} volumes"
            )
        return available
    missing = [c for c in grid.combinations if c not in available]
    if missing:
        raise InputError(
            "combinations",
            f"{split.source} has no set {', '.join(missing)} of {count} volumes "
            f"(it has {', '.join(available) or 'none'})",
        )
    return list(grid.combinations)


class _Namer:
    """Names pre-training runs; one config is one run, one name is one config."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.by_config: dict[str, str] = {}
        self.configs: dict[str, Any] = {}

    def add(self, name: str, config: Any) -> tuple[str, bool]:
        """The run's name (an earlier run's for an equal config) and whether it is new."""
        key = json.dumps(dataclasses.asdict(config), sort_keys=True)
        if key in self.by_config:
            return self.by_config[key], False
        full = f"{self.stage}/{name}"
        if full in self.configs:
            raise InputError(
                "initialisations",
                f"two different {self.stage} variants would share the folder {full}; "
                "make their keys differ in name",
            )
        self.by_config[key] = full
        self.configs[full] = config
        return full, True


@dataclass(frozen=True)
class _Init:
    """How an initialisation's fine-tuning runs start: the pre-training run whose product
    they load (with the configs of its stages, by grid section), what they load, and their
    folder under ``finetune/``."""

    pretrained: str
    load: str  # finetune.init
    folder: str
    stages: dict[str, Any]


def _label(section: str, config: Any, layer: dict[str, Any]) -> str:
    """The name of a pre-training run from its resolved config and its variant's keys."""
    if section == "pretrain_joint":
        label = f"{config.global_loss.strategy}+{config.local_loss.strategy}"
    elif section == "pretrain_pretext":
        label = config.pretext.task
    else:
        label = config.loss.strategy
    return variant_name(label, layer)


class _Pretraining:
    """The pre-training runs of a plan: one per resolved config, named by :func:`_label`."""

    def __init__(self, grid: Grid, out: Path) -> None:
        self.grid, self.out = grid, out
        self.namers = {section: _Namer(STAGES[section][0]) for section in PRETRAINING}
        self.runs: list[Run] = []

    def add(self, section: str, layer: dict[str, Any], where: str, on: str = "") -> tuple[str, Any]:
        """The run of ``section`` with the initialisation's ``layer`` (stage 2: on the stage-1
        run ``on``); returns its name and config."""
        extra = {"encoder": str(self.out / on)} if on else {}
        config = stage_config(self.grid, section, layer, extra, source=where)
        label = _label(section, config, layer)
        if on:
            label = f"{on.split('/', 1)[1]}+{label}"
        name, new = self.namers[section].add(label, config)
        if new:
            self.runs.append(Run(name, STAGES[section][0], config, needs=(on,) if on else ()))
        return name, config

    def initialisation(self, index: int, init: InitSpec, source: str) -> _Init:
        where = f"{source} (initialisations[{index}], {init.name})"
        load = finetune_init(self.grid, init)
        start = init.start()
        if not start:
            pretrained, stages = "", {}
        else:
            pretrained, config = self.add(start, getattr(init, start), where)
            stages = {start: config}
            if init.pretrain_local is not None:
                pretrained, config = self.add(
                    "pretrain_local", init.pretrain_local, where, on=pretrained
                )
                stages["pretrain_local"] = config
        folder = pretrained.split("/", 1)[1] if pretrained else "random"
        if start == "pretrain_joint":
            folder = f"joint-{folder}"  # not to be read as the stage-wise GD+LD
        if load == "encoder" and has_decoder(self.grid, init):
            folder += "-enc"  # only the encoder of a product that has decoder blocks
        if init.finetune:
            folder += "+" + "-".join(_key_parts(init.finetune))
        return _Init(pretrained, load, _safe(folder), stages)


def expand(grid: Grid, out: Path, split: Split, source: str = "grid") -> Plan:
    """Every run of ``grid`` with its config and dependencies, output under ``out``."""
    pretraining = _Pretraining(grid, out)
    inits: dict[str, _Init] = {}
    used: dict[str, str] = {}
    for i, spec in enumerate(grid.initialisations):
        init = pretraining.initialisation(i, spec, source)
        if init.folder in used:
            raise InputError(
                "initialisations",
                f"'{used[init.folder]}' and '{spec.name}' fine-tune from the same pre-training "
                "with the same settings (load and finetune keys)",
            )
        used[init.folder] = spec.name
        inits[spec.name] = init
    varied = _varied_keys(grid)
    finetuning = []
    counts = sorted(grid.labelled_volumes, key=labelled_order)
    for seed in grid.seeds:
        for count in counts:
            for combination in _combinations(grid, split, count):
                for spec in grid.initialisations:
                    run = _finetune_run(
                        grid, out, spec, inits[spec.name], count, combination, seed, source
                    )
                    keys = _grid_keys(varied, inits[spec.name], run.config)
                    finetuning.append(dataclasses.replace(run, keys=keys))
    order = sorted(pretraining.runs, key=lambda run: run.level)  # stable: grid order in a level
    return Plan(grid, out, split, tuple(order + finetuning))


def _finetune_run(
    grid: Grid,
    out: Path,
    spec: InitSpec,
    init: _Init,
    count: int | str,
    combination: str,
    seed: int,
    source: str,
) -> Run:
    where = f"{count}vol-{combination}" if count != ALL else "all"
    layer = {
        "finetune": {
            "labelled_volumes": count,
            "init": init.load,
            "pretrained": str(out / init.pretrained) if init.pretrained else "",
            **({"combination": combination} if count != ALL else {}),
        },
        "seed": seed,
    }
    config = stage_config(grid, "finetune", spec.finetune, layer, source=f"{source} ({spec.name})")
    return Run(
        f"finetune/{init.folder}/{where}-s{seed}",
        "finetune",
        config,
        needs=(init.pretrained,) if init.pretrained else (),
        init=spec.name,
        labelled_volumes=count,
        combination=combination,
        seed=seed,
    )


def _varied_keys(grid: Grid) -> list[str]:
    """Every key that any initialisation sets (``pretrain_global.loss.strategy``,
    ``finetune.finetune.mixup_alpha``, ...), and ``finetune.finetune.init`` when any chooses
    what it loads."""
    varied = {
        f"{section}.{key}"
        for init in grid.initialisations
        for section in STAGES
        for key in _flat(getattr(init, section) or {})
    }
    if any(init.load for init in grid.initialisations):
        varied.add("finetune.finetune.init")
    return sorted(varied)


def _grid_keys(varied: list[str], init: _Init, finetune: Any) -> dict[str, Any]:
    """A fine-tuning run's pre-training run and the value of each varied key in its configs,
    None where the initialisation has no such stage."""
    stages = {**init.stages, "finetune": finetune}
    row: dict[str, Any] = {"pretrained": init.pretrained}
    for key in varied:
        section, dotted = key.split(".", 1)
        value = stages.get(section)
        for part in dotted.split("."):
            value = None if value is None else getattr(value, part)
        row[key] = value
    return row


# ---------------------------------------------------------------------------------------------
# Where a run stands


STAGES_BY_COMMAND = {command: cls for command, cls in STAGES.values()}


def _same_config(run: Run, run_dir: Path) -> bool:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return False
    try:
        return load_config(STAGES_BY_COMMAND[run.stage], path) == run.config
    except InputError:
        return False


def run_state(run: Run, out: Path) -> str:
    """``finished`` (its product exists and was made by this config), ``trained`` (a
    fine-tuning run not yet evaluated), ``started`` (a run directory exists: it resumes or is
    refused by the trainer) or ``new``."""
    run_dir = out / run.name
    if not run_dir.is_dir():
        return "new"
    trained = (run_dir / "weights.safetensors").is_file() and _same_config(run, run_dir)
    if run.stage == "finetune":
        trained = trained and (run_dir / "model.json").is_file()
        if trained:
            evaluated = (run_dir / "evaluation" / "summary.json").is_file()
            return "finished" if evaluated else "trained"
    elif trained:
        return "finished"
    return "started"


def last_iteration(run_dir: Path) -> int:
    """The last logged iteration of a started run (0 when none), summed over the rounds of a
    self-training run: an estimate of where it resumes, which is at its last checkpoint, at
    most this."""
    rounds = sorted(run_dir.glob("round-*"))
    if rounds:
        return sum(last_iteration(folder) for folder in rounds)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    for line in reversed(path.read_text(errors="replace").splitlines()):
        try:
            return int(json.loads(line)["iteration"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0
