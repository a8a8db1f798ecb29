"""Benchmark: vectorised contrastive losses against their loop references, and against the UNet.

For each strategy, at the paper's sizes (global: 48 embeddings of 128; local: 24 feature maps of
64 x 48 x 48, the 17-region official grid with 13 anchors, 3 x 3 regions), it times one forward
+ backward of the vectorised loss and of the loop reference (``tests/support/loop_oracles.py``) in
the same process, and reports their ratio (target >= 20x). It also times one forward + backward
of the UNet at 192 x 192 with the same batch and reports the loss as a fraction of it (target
< 5%). The local timings include region extraction, which is part of the loss's cost.

Run: ``.venv/bin/python bench/bench_losses.py`` (CPU; ``--device cuda`` on a GPU). With
``--write`` the rows for this machine, torch version and device are replaced in BENCHMARKS.md,
other rows are kept.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
from benchmarks_md import BENCHMARKS, ROOT, machine, write_section

from contraseg.losses import global_contrastive_loss, local_contrastive_loss
from contraseg.models.heads import extract_regions, official_region_grid
from contraseg.models.unet import UNet

sys.path.insert(0, str(ROOT / "tests" / "support"))  # the loop oracles live with the tests
from loop_oracles import (
    extract_regions_reference,
    global_contrastive_loss_reference,
    local_contrastive_loss_reference,
)

COLUMNS = [
    "loss", "strategy", "input", "vectorised ms", "loop ms", "speed-up",
    "UNet f+b ms", "loss / UNet", "machine", "torch", "date",
]  # fmt: skip


def timed(
    fn: Callable[[], torch.Tensor], device: torch.device, repeats: int, warm_up: bool = True
) -> float:
    """Median wall time in ms of ``fn().backward()`` over ``repeats`` runs (after a warm-up).

    The loops and the UNet take seconds per call, so they skip the warm-up: its one-off costs
    (allocator, kernel selection) are negligible there, and the benchmark stays a few minutes.
    """
    times = []
    for i in range(repeats + int(warm_up)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i or not warm_up:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def ids(
    volumes: int, partitions: int, views: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    n = volumes * partitions
    return (
        torch.arange(n, device=device).repeat(views),
        (torch.arange(n, device=device) // partitions).repeat(views),
        (torch.arange(n, device=device) % partitions).repeat(views),
    )


def unet_ms(batches: tuple[int, ...], device: torch.device) -> dict[int, float]:
    """One forward + backward of the UNet (training mode) at 192 x 192 per batch size."""
    model = UNet().to(device).train()
    warm = torch.randn(2, 1, 192, 192, device=device)
    timed(lambda: model(warm).mean(), device, 1)
    times = {}
    for batch in batches:
        x = torch.randn(batch, 1, 192, 192, device=device)
        times[batch] = timed(partial(lambda inp: model(inp).mean(), x), device, 1, warm_up=False)
    return times


def local_vectorised(fmap, corners, neg_index, image, volume, partition, strategy):
    """Region extraction + loss, as the trainer computes it."""
    regions = extract_regions(fmap, corners, 3)
    return local_contrastive_loss(regions, image, volume, partition, strategy, neg_index)


def local_loop(fmap, corners, neg_index, image, volume, partition, strategy):
    regions = extract_regions_reference(fmap, corners, 3)
    return local_contrastive_loss_reference(regions, image, volume, partition, strategy, neg_index)


def run(device: torch.device, repeats: int) -> list[list[str]]:
    """One row per strategy: timings of the vectorised loss, its loop reference and the UNet."""
    unet = unet_ms((48, 24), device)
    cases = []
    z = torch.randn(48, 128, device=device, requires_grad=True)
    layouts = {"GR": ids(24, 1, 2, device), "GD-": ids(6, 4, 2, device), "GD": ids(6, 4, 2, device)}
    for strategy, layout in layouts.items():
        args = (z, *layout, strategy)
        fast = partial(global_contrastive_loss, *args)
        slow = partial(global_contrastive_loss_reference, *args)
        cases.append(("global", strategy, "48 x 128", fast, slow, 48))
    grid = official_region_grid(48, 48, 3)
    fmap = torch.randn(24, 64, 48, 48, device=device, requires_grad=True)
    shape = "24 x 64 x 48 x 48, 13 anchors, 3x3"
    for strategy, layout in {"LR": ids(12, 1, 2, device), "LD": ids(3, 4, 2, device)}.items():
        args = (fmap, grid.corners.to(device), grid.neg_index.to(device), *layout, strategy)
        cases.append(
            (
                "local",
                strategy,
                shape,
                partial(local_vectorised, *args),
                partial(local_loop, *args),
                24,
            )
        )

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    name = machine(device)
    rows = []
    for loss, strategy, shape, fast_fn, slow_fn, batch in cases:
        fast = timed(fast_fn, device, repeats)
        slow = timed(slow_fn, device, 1, warm_up=False)
        share = f"{100 * fast / unet[batch]:.3f}%"
        rows.append(
            [loss, strategy, shape, f"{fast:.2f}", f"{slow:.1f}", f"{slow / fast:.0f}x",
             f"{unet[batch]:.0f}", share, name, torch.__version__, stamp]
        )  # fmt: skip
    return rows


def write(rows: list[list[str]]) -> None:
    write_section(
        "bench_losses",
        "Contrastive losses (`bench/bench_losses.py`)",
        "Forward + backward of the vectorised loss vs the loop reference (target >= 20x), and "
        "vs one forward + backward of the UNet at 192 x 192 with the same batch (target < 5%).",
        COLUMNS,
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed runs of each vectorised loss"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for every timing (default 1: on a shared machine OpenMP threads spin "
        "waiting for each other and make small ops 100x slower at random)",
    )
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = run(torch.device(args.device), args.repeats)
    for row in rows:
        print("  ".join(row))
    if args.write:
        write(rows)
        print(f"wrote {BENCHMARKS}")


if __name__ == "__main__":
    main()
