"""Benchmark: the full training step against the network-only step (P2 of docs/training.md).

For each stage, in one process, it alternates timed windows of

- the **full step**: what the trainer does per iteration (draw a batch, augment it, forward,
  loss, backward, Adam step), through the stage's own code;
- the **network-only step**: a bare PyTorch loop over the same model and optimiser on a batch
  that is already on the device (forward, mean of the output, backward, Adam step),

and reports their ratio (target at most 1.15 at the paper's sizes) and their difference, the
fixed per-iteration overhead, in ms (reported at the tiny size, 32 x 32 with 4 images).

Sizes: ``paper``: 192 x 192; pre-training 5 volumes x 4 partitions x 2 views (40 images), local
12 x 2, fine-tuning 20. ``tiny``: 32 x 32, 4 images per batch (x 2 views for pre-training).
The data is a phantom prepared at that size in a temporary folder.

Run: ``.venv/bin/python bench/bench_step.py --sizes tiny paper`` (``--device cuda`` on a GPU).
``--write`` replaces this machine's rows in BENCHMARKS.md. One thread on the CPU (see
BENCHMARKS.md). ``--label`` names the code measured (e.g. ``main e92b319``).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from benchmarks_md import BENCHMARKS, machine, write_section

from contraseg.config import FinetuneRun, PretrainGlobalRun, PretrainLocalRun, load_config
from contraseg.data.phantom import write_phantom_dataset
from contraseg.training.checkpoint import save_weights
from contraseg.training.stages import Finetuner, GlobalPretrainer, LocalPretrainer
from contraseg.training.trainer import Trainer

COLUMNS = [
    "stage", "size", "images", "full step ms", "network-only ms", "full / network",
    "overhead ms", "code", "machine", "torch", "date",
]  # fmt: skip

SIZES = {
    "paper": {
        "size": 192,
        "model": [],
        "global": ["loss.volumes_per_batch=5", "loss.partitions=4"],
        "local": ["optim.batch_size=12"],
        "finetune": ["optim.batch_size=20"],
    },
    "tiny": {
        "size": 32,
        "model": ["model.widths=[4,8,8,8,8,8]", "model.g1_hidden=32", "model.g1_out=16"],
        "global": ["loss.volumes_per_batch=1", "loss.partitions=4"],
        "local": ["optim.batch_size=4"],
        "finetune": ["optim.batch_size=4"],
    },
}
STAGES = {
    "pretrain-global": (PretrainGlobalRun, GlobalPretrainer, "global"),
    "pretrain-local": (PretrainLocalRun, LocalPretrainer, "local"),
    "finetune": (FinetuneRun, Finetuner, "finetune"),
}


def data_overrides(root: Path, size: int) -> list[str]:
    """The phantom reader's field of view (64 px of 1.7 mm) sampled at ``size`` pixels."""
    spacing = 1.7 * 64 / size
    return [
        "data.dataset=phantom",
        f"data.root={root}",
        f"data.size=[{size},{size}]",
        f"data.target_spacing=[{spacing},{spacing}]",
    ]


def network_fn(trainer: Trainer, stage: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The stage's trained network, input images to embeddings (or logits)."""
    if stage == "pretrain-global":
        return lambda x: trainer.g1(trainer.unet.encode(x)[0])
    if stage == "pretrain-local":
        blocks = trainer.config.loss.decoder_blocks

        def local(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                bottleneck, skips = trainer.unet.encode(x)
            return trainer.embedder(trainer.unet.decode(bottleneck, skips, blocks=blocks))

        return local
    return trainer.unet


def full_step(trainer: Trainer, iteration: int) -> None:
    """One iteration of the trainer's loop, without its log and checkpoint points."""
    if hasattr(trainer, "train_step"):
        trainer.train_step(iteration)
        return
    trainer.model.train()
    cuda = trainer.device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        loss, _ = trainer.compute_loss(iteration)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()


def network_step(trainer: Trainer, net: Callable, images: torch.Tensor) -> None:
    trainer.model.train()
    if isinstance(trainer, LocalPretrainer):
        trainer.unet.encoder.eval()
    cuda = trainer.device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        out = net(images).float().mean()
    trainer.optimizer.zero_grad(set_to_none=True)
    out.backward()
    trainer.optimizer.step()


def window_ms(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    """Mean ms per call of ``fn`` over ``steps`` calls, the device drained at both ends.

    On the CPU this is the process's CPU time (one thread): the machine is shared, and wall
    time would count the other processes' turns.
    """
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (clock() - start) * 1e3 / steps


def input_images(trainer: Trainer, stage: str, size: int) -> torch.Tensor:
    cfg = trainer.config
    if stage == "pretrain-global":
        n = 2 * cfg.loss.volumes_per_batch * cfg.loss.partitions
    elif stage == "pretrain-local":
        n = 2 * cfg.optim.batch_size
    else:
        n = cfg.optim.batch_size
    return torch.rand(n, trainer.unet.in_channels, size, size, device=trainer.device)


def measure(
    stage: str, size_name: str, root: Path, work: Path, device: str, rounds: int, steps: int
) -> tuple[list[str], float, float]:
    run_class, trainer_class, key = STAGES[stage]
    spec = SIZES[size_name]
    overrides = [
        *data_overrides(root, spec["size"]),
        *spec["model"],
        *spec[key],
        "optim.iterations=100000",
    ]
    if stage == "pretrain-local":
        encoder = work / f"encoder-{size_name}"
        if not (encoder / "weights.safetensors").exists():
            source = GlobalPretrainer(
                load_config(
                    PretrainGlobalRun, None, [*data_overrides(root, spec["size"]), *spec["model"]]
                ),
                work / "unused",
                device,
            )
            source.setup()
            save_weights(encoder / "weights.safetensors", source.final_weights())
        overrides.append(f"encoder={encoder}")
    trainer = trainer_class(load_config(run_class, None, overrides), work / stage, device)
    trainer.setup()
    trainer.model.to(trainer.device)
    images = input_images(trainer, stage, spec["size"])
    net = network_fn(trainer, stage)
    full, bare = [], []
    iteration = 0

    def step() -> None:
        nonlocal iteration
        iteration += 1
        full_step(trainer, iteration)

    step()  # warm-up of both
    network_step(trainer, net, images)
    for _ in range(rounds):
        full.append(window_ms(step, steps, trainer.device))
        bare.append(window_ms(lambda: network_step(trainer, net, images), steps, trainer.device))
    full_ms, bare_ms = statistics.median(full), statistics.median(bare)
    return [stage, f"{spec['size']} x {spec['size']}", str(images.shape[0])], full_ms, bare_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["tiny", "paper"])
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed windows")
    parser.add_argument("--label", default="", help="the code measured, for the 'code' column")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = work / "phantom"
        write_phantom_dataset(root, volumes=24, size=96, seed=0)
        for size_name in args.sizes:
            # tiny steps take milliseconds: long windows; paper-size CPU steps take seconds
            steps = 30 if size_name == "tiny" or device.type == "cuda" else 1
            for stage in args.stages:
                head, full, bare = measure(
                    stage, size_name, root, work, args.device, args.rounds, steps
                )
                row = [
                    *head,
                    f"{full:.2f}",
                    f"{bare:.2f}",
                    f"{full / bare:.3f}",
                    f"{full - bare:.2f}",
                    args.label,
                    machine(device),
                    torch.__version__,
                    datetime.date.today().isoformat(),
                ]
                print(" | ".join(row), flush=True)
                rows.append(row)
    if args.write:
        write_section(
            "bench_step",
            "Full training step vs network-only step (`bench/bench_step.py`)",
            "Per stage, in one process: the trainer's iteration (sampling, augmentation, "
            "forward, loss, backward, Adam) against a bare PyTorch loop of the same model and "
            "optimiser on a batch already on the device. Target (P2): full / network at most "
            "1.15 at 192 x 192. The overhead column is their difference per iteration.",
            COLUMNS,
            rows,
            key=("stage", "size", "code", "machine", "torch"),
        )
        print(f"rows written to {BENCHMARKS}")


if __name__ == "__main__":
    main()
