"""Benchmark: where a training step's time goes, per stage: host or device, and which kernels.

For each stage and variant, on a trainer built as ``bench_train`` builds it (``Trainer.build``,
then ``train_step`` called directly), after a warm-up (compilation and CUDA graph recording):

1. an unprofiled window of steps, timed twice: **wall** ms per step (until the device has
   finished) and **host** ms per step (until the last step was queued). Host close to wall:
   the step is bound by Python and kernel launches, and fewer, larger kernels will help;
   host well below wall: the device is busy, and only less arithmetic or memory traffic will.
2. a window under ``torch.profiler``: on a GPU the **kernels** launched per step, the time per
   step the device spent in them (**busy**), and the kernels that took most of it; on the CPU
   the aten operators dispatched per step (what would each be a kernel launch on a GPU).

Run: ``.venv/bin/python bench/bench_profile.py`` (CPU, 32 x 32, eager); ``bench/gpu.sh`` runs
it on a GPU at the paper's size with the default (compiled) and eager variants. ``--write``
replaces this machine's rows in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from bench_train import (
    SIZES,
    Bench,
    add_stage_options,
    bench_device,
    built,
    git_label,
    sync,
)
from benchmarks_md import machine, write_section
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from contraseg.training.trainer import Trainer

COLUMNS = [
    "stage", "size", "variant", "wall ms", "host ms", "busy ms", "kernels", "busiest kernels",
    "code", "machine", "torch", "date",
]  # fmt: skip
SECTION = (
    "bench_profile",
    "Where a training step's time goes (`bench/bench_profile.py`)",
    "Per step of Trainer.train_step: wall time, host time (until the step is queued), and under "
    "torch.profiler the device's busy time, the kernels launched (on the CPU: aten operators "
    "dispatched) and the kernels with most of the busy time. Host close to wall: bound by "
    "Python and launches.",
)
KEY = ("stage", "size", "variant", "code", "machine", "torch")
TOP = 3  # kernels named in a row


def window(trainer: Trainer, first: int, steps: int) -> tuple[float, float]:
    """(wall ms, host ms) per step over ``steps`` steps from iteration ``first``."""
    device = trainer.device
    sync(device)
    start = time.perf_counter()
    for iteration in range(first, first + steps):
        trainer.train_step(iteration)
    queued = time.perf_counter()
    sync(device)
    end = time.perf_counter()
    return (end - start) * 1e3 / steps, (queued - start) * 1e3 / steps


def profiled(trainer: Trainer, first: int, steps: int) -> tuple[float | None, float, str]:
    """(busy ms, kernels, busiest kernels) per step; busy is None on the CPU, where the count
    is of top-level aten operators."""
    device = trainer.device
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    sync(device)
    with profile(activities=activities) as prof:
        for iteration in range(first, first + steps):
            trainer.train_step(iteration)
        sync(device)
    times: Counter[str] = Counter()
    if cuda:  # the device's rows: kernels, copies and fills, with their calls and own time
        kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        count = sum(e.count for e in kernels)
        for kernel in kernels:
            times[kernel.key] += kernel.self_device_time_total
        busy: float | None = sum(times.values()) / 1e3 / steps
    else:
        ops = [
            e
            for e in prof.events()
            if e.name.startswith("aten::")
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
            and e.device_type == DeviceType.CPU
        ]
        count = len(ops)
        for op in ops:
            times[op.name] += op.cpu_time_total
        busy = None
    total = sum(times.values()) or 1.0
    top = ", ".join(f"{name[:40]} {share / total:.0%}" for name, share in times.most_common(TOP))
    return busy, count / steps, top


def row(bench: Bench, stage: str, size: str, variant: str, warm_up: int, steps: int) -> list[str]:
    trainer = built(bench, stage, size, variant)
    window(trainer, 1, warm_up)
    wall, host = window(trainer, warm_up + 1, steps)
    busy, kernels, top = profiled(trainer, warm_up + steps + 1, steps)
    spec = SIZES[size]
    return [
        stage, f"{spec['size']} x {spec['size']}", variant, f"{wall:.2f}", f"{host:.2f}",
        "-" if busy is None else f"{busy:.2f}", f"{kernels:.0f}", top, bench.label,
        machine(bench.device), torch.__version__, datetime.date.today().isoformat(),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stage_options(parser)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--warm-up", type=int, default=10, help="untimed first steps")
    parser.add_argument("--steps", type=int, default=20, help="steps per window")
    args = parser.parse_args()
    device = bench_device(args.device)
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp), device, args.label or git_label())
        for stage in args.stages:
            for variant in args.variants:
                rows.append(row(bench, stage, args.size, variant, args.warm_up, args.steps))
                print(" | ".join(rows[-1]), flush=True)
                if args.write:  # as measured: a run stopped part-way keeps its rows
                    write_section(*SECTION, COLUMNS, rows, key=KEY)


if __name__ == "__main__":
    main()
