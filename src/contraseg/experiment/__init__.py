"""Grids of runs: the paper's tables from one YAML file each (docs/experiments.md).

``load_grid`` reads and checks a grid, ``expand`` turns it into runs with their dependencies,
``run_plan`` runs them (in this process, in worker processes, or as a shard), ``collect_rows``
and ``write_report`` turn the finished runs into results.csv, table.md and report.html;
``run_experiment`` does all of it, as ``contraseg experiment`` does.
"""

from contraseg.experiment.execute import Outcome, execute_run, run_plan
from contraseg.experiment.grid import Grid, InitSpec, PhantomSpec, load_grid
from contraseg.experiment.plan import Plan, Run, expand, run_state
from contraseg.experiment.report import write_report
from contraseg.experiment.results import collect_rows, write_tables
from contraseg.experiment.run import ExperimentResult, load_plan, run_experiment

__all__ = [
    "ExperimentResult",
    "Grid",
    "InitSpec",
    "Outcome",
    "PhantomSpec",
    "Plan",
    "Run",
    "collect_rows",
    "execute_run",
    "expand",
    "load_grid",
    "load_plan",
    "run_experiment",
    "run_plan",
    "run_state",
    "write_report",
    "write_tables",
]
