"""A grid expanded into its runs: what each is, what it needs, where it lives, whether it is done.

Each pre-training variant is one run, shared by every fine-tuning run that uses it; runs are
identified by their resolved config. Directory names are derived from what makes a run
different, so that they are readable and stay the same when a grid grows (docs/experiments.md):

    pretrain-global/GD-m31           stage 1: the strategy, then the variant's own keys
    pretrain-local/GD+LD-d1-K1       stage 2: its encoder's name + its strategy and keys
    finetune/GD+LD/1vol-c1-s0        stage 3: the initialisation's pre-training, set, seed
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
from contraseg.experiment.grid import STAGES, Grid, _flat, stage_config
from contraseg.report.stats import ALL, labelled_order

__all__ = [
    "LEVELS",
    "Plan",
    "Run",
    "expand",
    "run_state",
]

LEVELS = ("pretrain-global", "pretrain-local", "finetune")
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
}
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
        return int(self.config.optim.iterations)


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


def variant_name(strategy: str, layer: dict[str, Any]) -> str:
    """``GD`` + ``-m31`` for each key of the variant besides the strategy, in key order."""
    parts = [strategy]
    for key, value in sorted(_flat(layer).items()):
        if key == "loss.strategy":
            continue
        short = ABBREVIATIONS.get(key)
        parts.append(
            f"{short}{_value_text(value)}"
            if short
            else f"{key.split('.')[-1]}-{_value_text(value)}"
        )
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", "-".join(parts))


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


def expand(grid: Grid, out: Path, split: Split, source: str = "grid") -> Plan:
    """Every run of ``grid`` with its config and dependencies, output under ``out``."""
    global_names, local_names = _Namer("pretrain-global"), _Namer("pretrain-local")
    pretraining: list[Run] = []
    init_runs: dict[str, tuple[str, str]] = {}  # init name -> (pretrained run, finetune init)
    for i, init in enumerate(grid.initialisations):
        if init.pretrain_global is None:
            init_runs[init.name] = ("", "random")
            continue
        where = f"{source} (initialisations[{i}], {init.name})"
        config = stage_config(grid, "pretrain_global", init.pretrain_global, source=where)
        global_run, new = global_names.add(
            variant_name(config.loss.strategy, init.pretrain_global), config
        )
        if new:
            pretraining.append(Run(global_run, "pretrain-global", config))
        init_runs[init.name] = (global_run, "encoder")
        if init.pretrain_local is None:
            continue
        config = stage_config(
            grid,
            "pretrain_local",
            init.pretrain_local,
            {"encoder": str(out / global_run)},
            source=where,
        )
        name = variant_name(config.loss.strategy, init.pretrain_local)
        local_run, new = local_names.add(f"{global_run.split('/', 1)[1]}+{name}", config)
        if new:
            pretraining.append(Run(local_run, "pretrain-local", config, needs=(global_run,)))
        init_runs[init.name] = (local_run, "encoder+decoder")
    used: dict[str, str] = {}
    for init, (pretrained, _) in init_runs.items():
        folder = pretrained.split("/", 1)[1] if pretrained else "random"
        if folder in used:
            raise InputError(
                "initialisations",
                f"'{used[folder]}' and '{init}' fine-tune from the same pre-training",
            )
        used[folder] = init
    keys = _grid_keys(grid, pretraining, init_runs)
    finetuning = []
    counts = sorted(grid.labelled_volumes, key=labelled_order)
    for seed in grid.seeds:
        for count in counts:
            for combination in _combinations(grid, split, count):
                for init, (pretrained, how) in init_runs.items():
                    finetuning.append(
                        _finetune_run(
                            grid, out, init, pretrained, how, count, combination, seed, source
                        )
                    )
    finetuning = [dataclasses.replace(run, keys=keys[run.init]) for run in finetuning]
    order = sorted(pretraining, key=lambda run: run.level)  # stable: grid order within a level
    return Plan(grid, out, split, tuple(order + finetuning))


def _finetune_run(
    grid: Grid,
    out: Path,
    init: str,
    pretrained: str,
    how: str,
    count: int | str,
    combination: str,
    seed: int,
    source: str,
) -> Run:
    folder = pretrained.split("/", 1)[1] if pretrained else "random"
    where = f"{count}vol-{combination}" if count != ALL else "all"
    layer = {
        "finetune": {
            "labelled_volumes": count,
            "init": how,
            "pretrained": str(out / pretrained) if pretrained else "",
            **({"combination": combination} if count != ALL else {}),
        },
        "seed": seed,
    }
    config = stage_config(grid, "finetune", layer, source=f"{source} ({init})")
    return Run(
        f"finetune/{folder}/{where}-s{seed}",
        "finetune",
        config,
        needs=(pretrained,) if pretrained else (),
        init=init,
        labelled_volumes=count,
        combination=combination,
        seed=seed,
    )


def _grid_keys(
    grid: Grid, pretraining: list[Run], init_runs: dict[str, tuple[str, str]]
) -> dict[str, dict[str, Any]]:
    """Per initialisation: its pre-training run, and the value of every key that any
    initialisation's variant sets (``pretrain_global.loss.strategy``, ...), None where the
    initialisation has no such stage."""
    varied = sorted(
        {
            f"{section}.{key}"
            for init in grid.initialisations
            for section in ("pretrain_global", "pretrain_local")
            for key in _flat(getattr(init, section) or {})
        }
    )
    configs = {run.name: run.config for run in pretraining}
    keys = {}
    for init, (pretrained, _) in init_runs.items():
        stages = {"pretrain_global": None, "pretrain_local": None}
        if pretrained:
            config = configs[pretrained]
            if pretrained.startswith("pretrain-local/"):
                stages["pretrain_local"] = config
                stages["pretrain_global"] = configs[_encoder_run(config)]
            else:
                stages["pretrain_global"] = config
        row: dict[str, Any] = {"pretrained": pretrained}
        for key in varied:
            section, dotted = key.split(".", 1)
            value = stages[section]
            for part in dotted.split("."):
                value = None if value is None else getattr(value, part)
            row[key] = value
        keys[init] = row
    return keys


def _encoder_run(config: Any) -> str:
    encoder = Path(config.encoder)
    return f"{encoder.parent.name}/{encoder.name}"


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
    """The last logged iteration of a started run (0 when none): an estimate of where it
    resumes, which is at its last checkpoint, at most this."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    for line in reversed(path.read_text(errors="replace").splitlines()):
        try:
            return int(json.loads(line)["iteration"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0
