"""Benchmark: batch augmentation against the same transforms applied image by image.

The trainer augments whole batches with torch ops on the training device, every image drawing
its own parameters. This times, in one process, one batch-call of ``finetune_augment`` (batch
20 at 192 x 192, the paper's fine-tuning batch) and of ``pretrain_view`` (48 images) against a
loop that calls the same function once per image, and both against one forward + backward of the
UNet on that batch, so that the cost of augmentation can be read as a fraction of a step. The
**compiled** column is the batch call as a compiled run makes it: parameters drawn on the host
and copied in one transfer, the applier compiled (with CUDA graphs on a GPU).

Run: ``.venv/bin/python bench/bench_augment.py`` (``--device cuda`` on a GPU; ``--write``
updates BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable

import torch
from benchmarks_md import BENCHMARKS, interleaved_medians, machine, write_section

from contraseg.config import FinetuneAugmentConfig, PretrainAugmentConfig
from contraseg.data.augment import apply_finetune, apply_view, finetune_augment, pretrain_view
from contraseg.models.unet import UNet

COLUMNS = [
    "transform", "batch", "batch call ms", "compiled ms", "per-image loop ms", "speed-up",
    "UNet f+b ms", "augment / UNet", "machine", "torch", "date",
]  # fmt: skip
WARM_UP = 3  # calls that compile the applier and record its CUDA graph


def time_transform(
    name: str,
    batch: int,
    transform: Callable[[torch.Tensor, torch.Tensor, Callable[..., object] | None], object],
    applier: Callable[..., object],
    model: UNet,
    device: torch.device,
    repeats: int,
    size: int,
    backend: str,
) -> list[str]:
    """One row; ``transform(images, labels, apply)`` augments with ``apply`` (None: eager)."""
    images = torch.rand(batch, 1, size, size, device=device)
    labels = torch.randint(0, 4, (batch, size, size), device=device)
    cuda = device.type == "cuda"
    compiled = torch.compile(applier, backend=backend, mode="reduce-overhead" if cuda else None)

    def compiled_call() -> object:
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        return transform(images, labels, compiled)

    for _ in range(WARM_UP):
        compiled_call()
    whole, fused, loop = interleaved_medians(
        [
            lambda: transform(images, labels, None),
            compiled_call,
            lambda: [transform(images[i : i + 1], labels[i : i + 1], None) for i in range(batch)],
        ],
        device,
        repeats,
    )
    [unet] = interleaved_medians([lambda: model(images).mean().backward()], device, 3)
    stamp = datetime.date.today().isoformat()
    return [
        name, str(batch), f"{whole:.1f}", f"{fused:.1f}", f"{loop:.1f}", f"{loop / whole:.1f}x",
        f"{unet:.0f}",
        f"{100 * whole / unet:.1f}%", machine(device), torch.__version__, stamp,
    ]  # fmt: skip


def run(
    device: torch.device, repeats: int, size: int = 192, backend: str = "inductor"
) -> list[list[str]]:
    """The rows at ``size`` x ``size`` (the table's are at 192), compiling with ``backend``
    (the tests' "aot_eager" only traces)."""
    generator = torch.Generator().manual_seed(0)
    model = UNet().to(device).train()
    finetune_cfg, pretrain_cfg = FinetuneAugmentConfig(), PretrainAugmentConfig()
    return [
        time_transform(
            "finetune_augment (affine + elastic)",
            20,
            lambda x, y, apply: finetune_augment(
                x, y, finetune_cfg, generator, apply or apply_finetune
            ),
            apply_finetune,
            model,
            device,
            repeats,
            size,
            backend,
        ),
        time_transform(
            "pretrain_view (crop + intensity)",
            48,
            lambda x, y, apply: pretrain_view(
                x, pretrain_cfg, generator, apply=apply or apply_view
            ),
            apply_view,
            model,
            device,
            repeats,
            size,
            backend,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(torch.device(args.device), args.repeats)
    for row in rows:
        print("  ".join(row))
    if not args.write:
        return
    write_section(
        "bench_augment",
        "Batch augmentation (`bench/bench_augment.py`)",
        "One batch call vs the same transform called image by image (same device, same process), "
        "and the batch call as a fraction of one UNet forward + backward at 192 x 192. Compiled: "
        "the batch call with its applier compiled (CUDA graphs on a GPU), as a compiled run "
        "makes it.",
        COLUMNS,
        rows,
        key=("transform", "machine", "torch"),
    )
    print(f"wrote {BENCHMARKS}")


if __name__ == "__main__":
    main()
