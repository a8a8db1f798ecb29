"""What every benchmark shares: the machine's name and its section of BENCHMARKS.md."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = """# Benchmarks

Timings are only comparable within a row: each ratio is measured in one process, on the machine
named in that row (CPU model from /proc/cpuinfo, or the GPU), with the torch version given.
Absolute milliseconds are reported for context, not as targets.
"""


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                threads = torch.get_num_threads()
                plural = "s" if threads != 1 else ""
                return f"{line.split(':', 1)[1].strip()} ({threads} thread{plural})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_section(
    name: str,
    title: str,
    intro: str,
    columns: Sequence[str],
    rows: list[list[str]],
    key: Sequence[str] = ("machine", "torch"),
) -> None:
    """Replace the rows of ``name``'s section that share ``key`` columns with a new row; keep the
    other rows (other machines, other torch versions) and the other sections."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    index = [list(columns).index(k) for k in key]
    keep: list[str] = []
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        section, tail = rest.split(end, 1)
        new = {tuple(r[i] for i in index) for r in rows}
        for line in section.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            is_row = line.startswith("|") and len(cells) == len(columns) and "---" not in line
            if is_row and cells != list(columns) and tuple(cells[i] for i in index) not in new:
                keep.append(line)
    else:
        head, tail = text.rstrip("\n") + "\n\n", "\n"
    table = [
        f"## {title}",
        "",
        intro,
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *keep,
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    BENCHMARKS.write_text(head + begin + "\n" + "\n".join(table) + "\n" + end + tail)


def interleaved_medians(
    fns: list[Callable[[], object]], device: torch.device, repeats: int
) -> list[float]:
    """Median milliseconds of each function, called in turn ``repeats`` times after one warm-up
    round, so that a load change on a shared machine hits all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats + 1):
        for fn, out in zip(fns, times, strict=True):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                out.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]
