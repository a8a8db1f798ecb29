"""Benchmark: the wall time of ``contraseg demo`` end to end (phantom, cache, the three stages,
evaluation, report), full or ``--quick``, on one device.

Targets: at most 60 s for the full demo on one GPU; on a 2-core CPU no slower than before.
Wall time, so on a shared machine compare rows measured under the same load only.

Run: ``.venv/bin/python bench/bench_demo.py --device cuda`` (``bench/gpu.sh`` does);
``--write`` replaces this machine's row in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import torch
from bench_train import git_label
from benchmarks_md import BENCHMARKS, machine, write_section

from contraseg.demo import run_demo

COLUMNS = ["demo", "wall s", "code", "machine", "torch", "date"]


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
        run_demo(Path(tmp) / "demo", quick=args.quick, device=args.device)
        wall = time.perf_counter() - start
    row = [
        "quick" if args.quick else "full",
        f"{wall:.0f}",
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
            "evaluation, report). Target: the full demo in at most 60 s on one GPU.",
            COLUMNS,
            [row],
            key=("demo", "code", "machine", "torch"),
        )
        print(f"row written to {BENCHMARKS}")


if __name__ == "__main__":
    main()
