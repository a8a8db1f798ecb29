"""Benchmark: the wall time of ``contraseg demo`` end to end (phantom, cache, the three stages,
evaluation, report), full or ``--quick``, on one device, and where it went: the runs' own
records of their pre-training, fine-tuning and test evaluation seconds (the rest is the
phantom, the cache, start-up and the report).

Targets: at most 60 s for the full demo on one GPU; on a 2-core CPU no slower than before.
Wall time, so on a shared machine compare rows measured under the same load only.

Run: ``.venv/bin/python bench/bench_demo.py --device cuda`` (``bench/gpu.sh`` does);
``--write`` replaces this machine's row in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import torch
from bench_train import git_label
from benchmarks_md import BENCHMARKS, machine, write_section

from contraseg.demo import run_demo
from contraseg.experiment import ExperimentResult
from contraseg.experiment.plan import TIME_FILE

COLUMNS = [
    "demo", "wall s", "pre-training s", "fine-tuning s", "evaluation s", "code", "machine",
    "torch", "date",
]  # fmt: skip


def phases(result: ExperimentResult) -> list[str]:
    """Seconds the runs recorded: pre-training, fine-tuning and test evaluation."""
    pre = fine = evaluation = 0.0
    for run in result.plan.runs:
        times = json.loads((result.plan.out / run.name / TIME_FILE).read_text())
        if run.stage == "finetune":
            fine += times.get("train_s", 0.0)
            evaluation += times.get("evaluate_s", 0.0)
        else:
            pre += times.get("train_s", 0.0)
    return [f"{pre:.0f}", f"{fine:.0f}", f"{evaluation:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--label", default="", help="the code measured (default: git commit)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = run_demo(Path(tmp) / "demo", quick=args.quick, device=args.device)
        wall = time.perf_counter() - start
        spent = phases(result)
    row = [
        "quick" if args.quick else "full",
        f"{wall:.0f}",
        *spent,
        args.label or git_label(),
        machine(device),
        torch.__version__,
        datetime.date.today().isoformat(),
    ]
    print(" | ".join(row))
    if args.write:
        write_section(
            "bench_demo",
            "The demo end to end (`bench/bench_demo.py`)",
            "Wall time of `contraseg demo` (phantom, cache, pre-training, fine-tuning, "
            "evaluation, report), and the seconds its runs recorded for pre-training, "
            "fine-tuning and test evaluation. Target: the full demo in at most 60 s on one GPU.",
            COLUMNS,
            [row],
            key=("demo", "code", "machine", "torch"),
        )
        print(f"row written to {BENCHMARKS}")


if __name__ == "__main__":
    main()
