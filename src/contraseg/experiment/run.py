"""``contraseg experiment``: a grid from its YAML files to results.csv, table.md and report.html.

The same command continues a grid stopped at any point: finished runs are skipped, an
interrupted run resumes from its checkpoint. See docs/experiments.md for the folder layout,
parallel workers and shards.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from contraseg import fileio
from contraseg.data.cache import PreparedDataset
from contraseg.data.dataset import load_dataset
from contraseg.data.phantom import write_phantom_dataset
from contraseg.errors import InputError
from contraseg.experiment.execute import (
    Outcome,
    execute_run,
    parse_devices,
    parse_shard,
    run_plan,
    shard_runs,
)
from contraseg.experiment.grid import Grid, load_grid, save_grid
from contraseg.experiment.plan import LEVELS, Plan, expand, run_state
from contraseg.experiment.probe import describe_plan, probe
from contraseg.experiment.report import PHANTOM_NOTE, write_report
from contraseg.experiment.results import Row, collect_rows, comparison_table, write_tables
from contraseg.report import stats
from contraseg.training.trainer import Speed

__all__ = ["ExperimentResult", "load_plan", "run_experiment"]

MARKER = ".contraseg-experiment"
PHANTOM_RECORD = ".contraseg-phantom.json"


@dataclasses.dataclass
class ExperimentResult:
    """What :func:`run_experiment` did: the plan, this invocation's outcome (None for a dry
    run or a single worker run) and the rows of every finished fine-tuning run."""

    plan: Plan
    outcome: Outcome | None
    rows: list[Row]


def claim_out(out: Path) -> list[Path]:
    """Make ``out`` the experiment's folder: a new or empty folder, or one it made before.
    Returns the folders created (deepest first), for :func:`release_out`."""
    if out.is_dir() and not (out / MARKER).exists() and any(out.iterdir()):
        raise InputError(
            out,
            f"is not empty and is not a contraseg experiment folder (it has no {MARKER}); "
            "give a new or empty folder",
        )
    created = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).exists():
        fileio.write_text(out / MARKER, "contraseg experiment folder\n")
    return created


def release_out(out: Path, created: list[Path]) -> None:
    """Undo :func:`claim_out` after a failed start: a folder it created that holds nothing but
    the marker is removed again."""
    if created and {p.name for p in out.iterdir()} <= {MARKER}:
        (out / MARKER).unlink(missing_ok=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                return


def ensure_phantom(grid: Grid, out: Path) -> Grid:
    """Write the grid's phantom into ``data.root`` (default ``out/data/phantom``) unless it is
    there with the same settings; return the grid with that root."""
    if grid.phantom is None:
        return grid
    root = Path(grid.data.root) if grid.data.root else out / "data" / "phantom"
    spec = dataclasses.asdict(grid.phantom)
    record = root / PHANTOM_RECORD
    if record.is_file():
        written = json.loads(record.read_text())
        if {k: written.get(k) for k in spec} != spec:
            raise InputError(
                root,
                f"holds a phantom made with {written}, not {spec}; give another --out (or "
                "data.root)",
            )
        complete = bool(written.get("complete"))
    elif root.is_dir() and any(root.iterdir()):
        raise InputError(
            root,
            "is not empty and holds no phantom made by an experiment; give an empty data.root, "
            "or drop 'phantom' from the grid to use the data there",
        )
    else:
        complete = False
    if not complete:
        fileio.write_json(record, {**spec, "complete": False})
        write_phantom_dataset(
            root,
            volumes=spec["volumes"],
            size=spec["size"],
            seed=spec["seed"],
            preset=spec["preset"],
        )
        fileio.write_json(record, {**spec, "complete": True})
    return dataclasses.replace(grid, data=dataclasses.replace(grid.data, root=str(root)))


def load_plan(
    configs: Sequence[str | Path], out: Path, overrides: Sequence[str] = (), claim: bool = True
) -> tuple[Plan, PreparedDataset]:
    """The grid's plan and the prepared dataset. With ``claim`` (or a phantom to write), the
    output folder is claimed first; a folder made here is removed again if planning fails."""
    grid = load_grid(configs, overrides)
    created = claim_out(out) if claim or grid.phantom is not None else []
    try:
        grid = ensure_phantom(grid, out)
        prepared, split = load_dataset(grid.data)
        source = " + ".join(str(p) for p in configs)
        return expand(grid, out, split, source), prepared
    except BaseException:
        release_out(out, created)
        raise


def _worker_command(
    configs: Sequence[str | Path], out: Path, overrides: Sequence[str], no_compile: bool
) -> Callable[[str, str], list[str]]:
    def command(run: str, device: str) -> list[str]:
        files = [arg for path in configs for arg in ("--config", str(Path(path).absolute()))]
        return [
            sys.executable,
            "-m",
            "contraseg.cli",
            "experiment",
            *files,
            "--out",
            str(out),
            "--run",
            run,
            "--device",
            device,
            *(["--no-compile"] if no_compile else []),
            *overrides,
        ]

    return command


def print_results(plan: Plan, rows: Sequence[Row], say: Callable[[str], None] = print) -> None:
    """The table of test Dice and, for each initialisation, the paired comparison and its
    verdict."""
    say("\ntest Dice, mean ± sample std over labelled sets and seeds (n runs):")
    say(stats.summary_markdown(rows))
    if plan.grid.baseline:
        comparisons = stats.compare_to_baseline(rows, plan.grid.baseline)
        if comparisons:
            say("\n" + stats.markdown_table(*comparison_table(comparisons)))
            say("\n" + "\n".join(c.verdict for c in comparisons))
    if plan.grid.data.dataset == "phantom":
        say(f"\n{PHANTOM_NOTE}")


def run_experiment(
    configs: Sequence[str | Path],
    out: str | Path,
    overrides: Sequence[str] = (),
    *,
    device: str = "auto",
    devices: str | None = None,
    shard: str | None = None,
    level: str | None = None,
    dry_run: bool = False,
    wait_timeout: float = 86400.0,
    run: str | None = None,
    no_compile: bool = False,
    say: Callable[[str], None] = print,
) -> ExperimentResult:
    """Run the grid of ``configs`` (+ ``overrides``) into ``out``; see docs/experiments.md.

    ``devices`` ("0,1,2,3" or "cpu,cpu") runs one worker process per entry; ``shard`` ("i/n")
    takes every n-th run of each level; ``level`` restricts to one level and does not wait for
    another process's runs; ``run`` executes that one run only (what a worker does);
    ``no_compile`` never compiles a network (``--no-compile``).
    """
    out = fileio.check_out_dir(out)
    if level is not None and level not in LEVELS:
        raise InputError("--level", f"must be one of {', '.join(LEVELS)}, got {level!r}")
    if devices is not None and device != "auto":
        raise InputError("--device", "give --device or --devices, not both")
    slots = parse_devices(devices) if devices is not None else None
    chosen_shard = parse_shard(shard) if shard is not None else None
    if run is not None:
        plan, _ = load_plan(configs, out, overrides, claim=False)
        execute_run(plan.run(run), out, device, Speed(compile=False) if no_compile else None)
        return ExperimentResult(plan, None, [])
    plan, prepared = load_plan(configs, out, overrides, claim=not dry_run)
    mine = shard_runs(plan, chosen_shard, level)
    if dry_run:
        todo = [r for r in mine if run_state(r, out) != "finished"]
        probe_device = slots[0].device if slots else device
        speeds = probe(todo, prepared, len(plan.split.test), probe_device) if todo else {}
        describe_plan(plan, mine, speeds, probe_device, len(slots or [None]), say)
        return ExperimentResult(plan, None, collect_rows(plan))
    save_grid(plan.grid, out / "grid.yaml")
    say(
        f"{len(mine)} of the grid's {len(plan.runs)} runs in this invocation"
        + (f" (shard {shard})" if shard else "")
        + (f" (level {level})" if level else "")
    )
    outcome = run_plan(
        plan,
        mine,
        device=device,
        slots=slots,
        worker_command=_worker_command(configs, out, overrides, no_compile) if slots else None,
        wait=level is None,
        wait_timeout=wait_timeout,
        say=say,
        no_compile=no_compile,
    )
    say(outcome.summary())
    rows = collect_rows(plan)
    if rows and level in (None, "finetune"):
        write_tables(plan, rows)
        page = write_report(plan, rows, slots[0].device if slots else device)
        print_results(plan, rows, say)
        say(f"\nresults in {out / stats.RESULTS_CSV}, {out / 'table.md'}; report in {page}")
    for name, why in {**outcome.failed, **outcome.blocked}.items():
        say(f"{'failed' if name in outcome.failed else 'not started'}: {name}: {why}")
    return ExperimentResult(plan, outcome, rows)
