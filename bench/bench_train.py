"""Benchmark: the three stages' training speed (P3) and per-iteration overhead (P2).

On a phantom prepared at the stage's size, in one process, for each stage and each variant of
:class:`~contraseg.training.trainer.Speed` asked for:

1. **run** (``--run-iterations N``): ``Trainer.run`` for N iterations from scratch, with the
   default log, checkpoint and (fine-tuning) validation rhythm; the iterations after
   ``--warm-up`` are timed, which gives it/s, and the time of 10,000 iterations is
   extrapolated as set-up + warm-up (compilation included) + 9,980 timed-rate iterations. With
   it: peak device memory, and the ratio to the paper's Titan X times (supplement 1.4: 2 h
   global, 4 h local, 2 h fine-tuning). Target on one H100/H200: 10,000 iterations in 60 s.
2. **steps**: on the same trainer, timed windows of the *full step* (``Trainer.train_step``:
   draw, augment, forward, loss, backward, Adam) and of the *network-only step* (a bare
   PyTorch loop over the same network and optimiser on a batch already on the device:
   forward, mean, backward, Adam), for every variant asked for, all taken in turn. Target:
   full / network <= 1.15 at the paper's size; their difference at the tiny size is the fixed
   per-iteration overhead.

Sizes: ``paper``: 192 x 192; pre-training 5 volumes x 4 partitions x 2 views (40 images),
local 12 x 2, fine-tuning 20 with validation every 50. ``demo``: the demo's (64 x 64, 4 x 4 x 2
images, fine-tuning 4). ``tiny``: 32 x 32, 4 images per batch (x 2 views), a narrow network.

Run: ``.venv/bin/python bench/bench_train.py`` (CPU: step ratios at the tiny and the paper's
size, eager);
``bench/gpu.sh`` runs it on a GPU with every variant. ``--write`` replaces this machine's rows
in BENCHMARKS.md; ``--label`` names the code measured (default: the git commit).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from benchmarks_md import BENCHMARKS, machine, write_section

from contraseg.config import FinetuneRun, PretrainGlobalRun, PretrainLocalRun, load_config
from contraseg.data.phantom import write_phantom_dataset
from contraseg.training.checkpoint import save_weights
from contraseg.training.stages import Finetuner, GlobalPretrainer, LocalPretrainer
from contraseg.training.trainer import Speed, Trainer, compile_by_default, cudnn_benchmark

SIZES = {
    "paper": {
        "size": 192,
        "model": [],
        "pretrain-global": ["loss.volumes_per_batch=5", "loss.partitions=4"],
        "pretrain-local": ["optim.batch_size=12"],
        "finetune": ["optim.batch_size=20", "finetune.val_every=50"],
    },
    "demo": {  # grids/demo.yaml
        "size": 64,
        "model": ["model.widths=[8,16,32,64,64,64]"],
        "pretrain-global": ["loss.volumes_per_batch=4", "loss.partitions=4"],
        "pretrain-local": [
            "loss.strategy=LD",
            "loss.volumes_per_batch=4",
            "loss.partitions=4",
            "optim.batch_size=12",
        ],
        "finetune": ["optim.batch_size=4", "finetune.val_every=40"],
    },
    "tiny": {
        "size": 32,
        "model": ["model.widths=[4,8,8,8,8,8]", "model.g1_hidden=32", "model.g1_out=16"],
        "pretrain-global": ["loss.volumes_per_batch=1", "loss.partitions=4"],
        "pretrain-local": ["optim.batch_size=4"],
        "finetune": ["optim.batch_size=4"],
    },
}
STAGES = {
    "pretrain-global": (PretrainGlobalRun, GlobalPretrainer),
    "pretrain-local": (PretrainLocalRun, LocalPretrainer),
    "finetune": (FinetuneRun, Finetuner),
}
TITAN_X_HOURS = {"pretrain-global": 2.0, "pretrain-local": 4.0, "finetune": 2.0}
# The variants: the device's defaults, compiled whatever the device (the CPU's default is
# eager), then each default switched off on its own.
VARIANTS = {
    "default": Speed(),
    "compiled": Speed(compile=True),
    "no-compile": Speed(compile=False),
    "fp32": Speed(compile=False, autocast=False),
    "no-channels-last": Speed(compile=False, channels_last=False),
    "no-fused-adam": Speed(compile=False, fused_adam=False),
    # the slices gathered on the host (the next batch in a background thread), not resident
    "host-pool": Speed(pool_budget=0),
    "cudnn-benchmark": Speed(cudnn_benchmark=True),
}

STEP_COLUMNS = [
    "stage", "size", "images", "variant", "full step ms", "network-only ms", "full / network",
    "overhead ms", "code", "machine", "torch", "date",
]  # fmt: skip
RUN_COLUMNS = [
    "stage", "variant", "compiled", "it/s", "set-up + warm-up s", "10k iterations s",
    "Titan X (paper)", "speed-up vs Titan X", "peak GiB", "code", "machine", "torch", "date",
]  # fmt: skip
STEP_SECTION = (
    "bench_step",
    "Full training step vs network-only step (`bench/bench_train.py`)",
    "Per stage, in one process: Trainer.train_step (sampling, augmentation, forward, loss, "
    "backward, Adam) against a bare PyTorch loop of the same network and optimiser on a batch "
    "already on the device. Target (P2): full / network at most 1.15 at 192 x 192. The overhead "
    "column is their difference per iteration (at 32 x 32: the fixed per-iteration overhead). "
    "CPU rows: CPU time of one thread.",
)
STEP_KEY = ("stage", "size", "variant", "code", "machine", "torch")
RUN_SECTION = (
    "bench_stages",
    "Training speed of the stages at the paper's sizes (`bench/bench_train.py`)",
    "Trainer.run from scratch on a 192 x 192 phantom with the default log, checkpoint and "
    "validation rhythm; it/s over the iterations after the warm-up, and 10,000 iterations "
    "extrapolated from them (set-up and warm-up, compilation included, counted once). Target "
    "(P3): at most 60 s on one H100 or H200. Titan X: the paper's times (supplement 1.4).",
)
RUN_KEY = ("stage", "variant", "code", "machine", "torch")
COMPILE_COLUMNS = [
    "stage", "extra warm-up s", "ms saved per iteration", "break-even iterations", "code",
    "machine", "torch", "date",
]  # fmt: skip
COMPILE_SECTION = (
    "bench_compile",
    "When torch.compile pays for itself (`bench/bench_train.py`)",
    "From the runs of the default variant (compiled) and of no-compile above: the compiled "
    "run's extra set-up and warm-up, the time it saves per iteration, and the iterations after "
    "which it has repaid its warm-up (what COMPILE_MIN_ITERATIONS in "
    "contraseg/training/trainer.py should be; the default run has 10,000).",
)


def compile_row(compiled: list[str], eager: list[str]) -> list[str]:
    """The row of COMPILE_COLUMNS from a compiled and an eager row of RUN_COLUMNS."""
    column = RUN_COLUMNS.index
    rate_c, rate_e = float(compiled[column("it/s")]), float(eager[column("it/s")])
    warm = column("set-up + warm-up s")
    extra = float(compiled[warm]) - float(eager[warm])
    saved = 1 / rate_e - 1 / rate_c
    even = f"{extra / saved:.0f}" if saved > 0 else "never"
    return [compiled[0], f"{extra:.1f}", f"{saved * 1e3:.2f}", even, *compiled[-4:]]


@dataclass
class Bench:
    root: Path  # phantoms and run directories
    device: torch.device
    label: str


def data_overrides(root: Path, size: int) -> list[str]:
    """A phantom with the phantom reader's field of view (64 px of 1.7 mm) at ``size`` px."""
    spacing = 1.7 * 64 / size
    phantom = root / f"phantom-{size}"
    if not phantom.exists():
        write_phantom_dataset(phantom, volumes=24, size=96, seed=0)
    return [
        "data.dataset=phantom",
        f"data.root={phantom}",
        f"data.size=[{size},{size}]",
        f"data.target_spacing=[{spacing},{spacing}]",
    ]


def config(bench: Bench, stage: str, size: str, iterations: int) -> object:
    spec = SIZES[size]
    base = [*data_overrides(bench.root, spec["size"]), *spec["model"]]
    overrides = [*base, *spec[stage], f"optim.iterations={iterations}"]
    if stage == "pretrain-local":
        encoder = bench.root / f"encoder-{size}"
        if not (encoder / "weights.safetensors").exists():
            source = GlobalPretrainer(
                load_config(PretrainGlobalRun, None, base), bench.root / "unused", bench.device
            )
            source.setup()
            save_weights(encoder / "weights.safetensors", source.final_weights())
        overrides.append(f"encoder={encoder}")
    return load_config(STAGES[stage][0], None, overrides)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> Callable[[], float]:
    """Wall time on a GPU; on the CPU the process's CPU time (one thread), since the machine
    is shared and wall time would count the other processes' turns."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def time_run(
    bench: Bench, stage: str, size: str, variant: str, iterations: int, warm_up: int
) -> tuple[list[str], Trainer]:
    """A run of ``iterations`` from scratch; the row of RUN_COLUMNS and the trained trainer."""
    speed = VARIANTS[variant]
    if speed.compile is None:  # the choice a run of 10,000 iterations makes
        speed = dataclasses.replace(speed, compile=compile_by_default(bench.device, 10_000))
    trainer = STAGES[stage][1](
        config(bench, stage, size, iterations),
        bench.root / f"run-{stage}-{variant}",
        bench.device,
        speed,
    )
    now = clock(bench.device)
    marks: dict[int, float] = {}
    step = trainer.train_step

    def timed_step(iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        if iteration in (warm_up + 1, iterations):
            sync(bench.device)
            marks[iteration] = now()
        return step(iteration)

    trainer.train_step = timed_step  # type: ignore[method-assign]
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    start = now()
    trainer.run(fresh=True)
    # from the start of the first timed iteration to the start of the last
    rate = (iterations - 1 - warm_up) / (marks[iterations] - marks[warm_up + 1])
    before = marks[warm_up + 1] - start
    total = before + (10_000 - warm_up) / rate
    titan = TITAN_X_HOURS[stage] * 3600
    cuda = bench.device.type == "cuda"
    peak = f"{torch.cuda.max_memory_allocated(bench.device) / 2**30:.2f}" if cuda else "-"
    row = [
        stage, variant, "yes" if trainer.compiled else "no", f"{rate:.1f}", f"{before:.1f}",
        f"{total:.0f}", f"{TITAN_X_HOURS[stage]:.0f} h", f"{titan / total:.0f}x", peak,
        bench.label, machine(bench.device), torch.__version__, datetime.date.today().isoformat(),
    ]  # fmt: skip
    return row, trainer


def network_step(trainer: Trainer, images: torch.Tensor) -> None:
    """The bare loop's iteration on the trainer's (wrapped) network and optimiser."""
    assert trainer.net is not None
    if trainer.cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()
    trainer.model.train()
    if isinstance(trainer, LocalPretrainer):
        trainer.unet.encoder.eval()
    with cudnn_benchmark(trainer.speed.cudnn_benchmark):
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.autocast):
            out = trainer.net(images).float().mean()
        trainer.optimizer.zero_grad(set_to_none=True)
        out.backward()
    trainer.optimizer.step()


def input_images(trainer: Trainer) -> torch.Tensor:
    """A batch of the shape the stage's network takes (both views), already on the device."""
    images = trainer.sampler.sample().images
    views = 1 if isinstance(trainer, Finetuner) else 2
    return torch.rand(views * images.shape[0], *images.shape[1:], device=trainer.device)


def time_steps(
    bench: Bench, trainers: dict[str, Trainer], stage: str, size: str, rounds: int, steps: int
) -> list[list[str]]:
    """One row of STEP_COLUMNS per variant: windows of each variant's full step and of its
    network-only step, taken in turn, so that a change of the machine's load hits all alike."""
    now = clock(bench.device)
    windows: list[Callable[[], None]] = []
    images = {}
    for variant, trainer in trainers.items():
        images[variant] = input_images(trainer)
        iteration = iter(range(trainer.iteration + 1, 10**9))

        def full(trainer: Trainer = trainer, iteration: Iterator[int] = iteration) -> None:
            trainer.train_step(next(iteration))

        windows += [full, functools.partial(network_step, trainer, images[variant])]
    for fn in windows:  # warm-up (compiles, when compiled and not yet run)
        fn()
    times: list[list[float]] = [[] for _ in windows]
    for _ in range(rounds):
        for fn, out in zip(windows, times, strict=True):
            sync(bench.device)
            start = now()
            for _ in range(steps):
                fn()
            sync(bench.device)
            out.append((now() - start) * 1e3 / steps)
    spec = SIZES[size]
    rows = []
    for index, variant in enumerate(trainers):
        full_ms = statistics.median(times[2 * index])
        net_ms = statistics.median(times[2 * index + 1])
        rows.append([
            stage, f"{spec['size']} x {spec['size']}", str(images[variant].shape[0]), variant,
            f"{full_ms:.2f}", f"{net_ms:.2f}", f"{full_ms / net_ms:.3f}",
            f"{full_ms - net_ms:.2f}", bench.label, machine(bench.device), torch.__version__,
            datetime.date.today().isoformat(),
        ])  # fmt: skip
    return rows


def built(bench: Bench, stage: str, size: str, variant: str) -> Trainer:
    """A trainer set up for ``train_step`` outside a run (no run directory is written)."""
    trainer = STAGES[stage][1](
        config(bench, stage, size, 100_000), bench.root / "unused", bench.device, VARIANTS[variant]
    )
    trainer.build()
    return trainer


def git_label() -> str:
    """The commit measured: ``git describe``, or $BENCH_LABEL where the tree is a copy without
    its .git (a lent GPU machine)."""
    if os.environ.get("BENCH_LABEL"):
        return os.environ["BENCH_LABEL"]
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def add_stage_options(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark of the stages takes: where, which stages and variants, and
    what to do with the rows."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["default"])
    parser.add_argument("--label", default="", help="the code measured (default: git commit)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")


def bench_device(name: str) -> torch.device:
    """The device measured; on the CPU with one thread, whose CPU time the rows report."""
    device = torch.device(name)
    if device.type == "cpu":
        torch.set_num_threads(1)
    return device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stage_options(parser)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["tiny", "paper"])
    parser.add_argument("--run-iterations", type=int, default=0, help="0: no timed run")
    parser.add_argument("--run-size", choices=list(SIZES), default="paper")
    parser.add_argument("--warm-up", type=int, default=20, help="untimed first iterations")
    parser.add_argument("--rounds", type=int, default=3, help="alternating step windows")
    parser.add_argument("--steps", type=int, default=0, help="steps per window (0: by size)")
    args = parser.parse_args()
    device = bench_device(args.device)
    run_rows: list[list[str]] = []
    step_rows: list[list[str]] = []

    def record(rows: list[list[str]], row: list[str]) -> None:
        """Print the row and, with --write, rewrite the sections so far: a run stopped
        part-way (a time limit on a lent GPU) keeps the rows it measured."""
        print(" | ".join(row), flush=True)
        rows.append(row)
        if args.write:
            write_rows(run_rows, step_rows, args.stages)

    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp), device, args.label or git_label())
        for stage in args.stages:
            ran: dict[str, Trainer] = {}
            if args.run_iterations:
                for variant in args.variants:
                    row, ran[variant] = time_run(
                        bench, stage, args.run_size, variant, args.run_iterations, args.warm_up
                    )
                    record(run_rows, row)
            for size in args.sizes:
                trainers = {
                    variant: ran[variant]
                    if size == args.run_size and variant in ran
                    else built(bench, stage, size, variant)
                    for variant in args.variants
                }
                slow = size == "paper" and device.type == "cpu"
                steps = args.steps or (1 if slow else 30)
                for row in time_steps(bench, trainers, stage, size, args.rounds, steps):
                    record(step_rows, row)
                del trainers
    for row in compile_rows(run_rows, args.stages):
        print(" | ".join(row), flush=True)
    if args.write:
        print(f"rows written to {BENCHMARKS}")


def compile_rows(run_rows: list[list[str]], stages: list[str]) -> list[list[str]]:
    by_stage = {(row[0], row[2]): row for row in run_rows}  # (stage, compiled)
    return [
        compile_row(by_stage[stage, "yes"], by_stage[stage, "no"])
        for stage in stages
        if (stage, "yes") in by_stage and (stage, "no") in by_stage
    ]


def write_rows(run_rows: list[list[str]], step_rows: list[list[str]], stages: list[str]) -> None:
    if run_rows:
        write_section(*RUN_SECTION, RUN_COLUMNS, run_rows, key=RUN_KEY)
    compiled = compile_rows(run_rows, stages)
    if compiled:
        write_section(*COMPILE_SECTION, COMPILE_COLUMNS, compiled, key=("stage", *RUN_KEY[2:]))
    if step_rows:
        write_section(*STEP_SECTION, STEP_COLUMNS, step_rows, key=STEP_KEY)


if __name__ == "__main__":
    main()
