"""The main job behind ``make demo``: a small grid on the embedded phantom (grids/demo.yaml
beside this module, or grids/demo_quick.yaml with ``--quick``), run by the experiment code
like any grid.

It generates the phantom, pre-trains the encoder with G^R and with G^D and the first decoder
blocks with L^D on the G^D encoder, fine-tunes every initialisation (random, G^R, G^D,
G^D + L^D) on the same labelled sets with the same seeds, evaluates each on the test volumes,
and writes results.csv, table.md, report.md and report.html. What it prints is what it measured
on the phantom, whatever that shows, with each initialisation's paired comparison against
random; the phantom is a stand-in for ACDC, and its numbers are not ACDC results. Running it
again reuses the finished runs and resumes an interrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from contraseg.experiment import ExperimentResult, run_experiment

# the demo's grids are package data, so that an installed wheel runs the demo too
GRIDS = Path(__file__).resolve().parent / "grids"


def demo_grid(quick: bool = False) -> Path:
    return GRIDS / ("demo_quick.yaml" if quick else "demo.yaml")


def run_demo(
    out: str | Path,
    quick: bool = False,
    device: str = "auto",
    overrides: Sequence[str] = (),
    no_compile: bool = False,
) -> ExperimentResult:
    """Run the demo grid (with ``overrides``, as ``key=value``) into ``out``; ``no_compile``
    as ``contraseg experiment --no-compile``."""
    started = time.perf_counter()
    result = run_experiment(
        [demo_grid(quick)], out, overrides, device=device, no_compile=no_compile
    )
    print(f"\ndemo wall time {(time.perf_counter() - started) / 60:.1f} min")
    return result
