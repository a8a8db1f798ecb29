"""The main job: the whole method end to end on the embedded phantom dataset.

Generates and prepares the phantom (once), pre-trains the encoder with G^D and the first decoder
blocks with L^D, fine-tunes on 1 and 2 labelled volumes from random weights, from ``e`` and from
``e`` + ``d_l`` (every initialisation on the same labelled volumes), evaluates each on the test
volumes, and writes ``results.json``, ``report.md`` and figures. Each stage run has its own
directory inside the output folder; running the demo again reuses the finished runs and resumes
an interrupted one.

What it prints is what it measured on the phantom, whatever that shows; the phantom is a
stand-in for ACDC, and its numbers are not ACDC results.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from contraseg import fileio
from contraseg.config import (
    DataConfig,
    FinetuneConfig,
    FinetuneRun,
    GlobalLossConfig,
    LocalLossConfig,
    ModelConfig,
    OptimConfig,
    PretrainGlobalRun,
    PretrainLocalRun,
)
from contraseg.data.cache import prepare_dataset
from contraseg.data.dataset import load_dataset
from contraseg.data.phantom import write_phantom_dataset
from contraseg.data.readers.acdc import PhantomReader
from contraseg.evaluation.evaluate import evaluate_run
from contraseg.inference import Segmenter, resolve_device, slice_probabilities
from contraseg.report import figures
from contraseg.report.markdown import write_report
from contraseg.training.stages import run_finetune, run_pretrain_global, run_pretrain_local


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and lengths of the demo; the defaults are set for a 2-core CPU."""

    volumes: int
    phantom_size: int
    widths: tuple[int, ...]
    global_iterations: int
    local_iterations: int
    finetune_iterations: int
    val_every: int
    labelled_volumes: tuple[int, ...]
    combinations: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    volumes_per_batch: int = 4
    local_batch: int = 12
    finetune_batch: int = 8
    image_size: int | None = None  # prepared in-plane size; None: the phantom reader's default


FULL = DemoPlan(
    volumes=60,
    phantom_size=96,
    widths=(8, 16, 32, 64, 64, 64),
    global_iterations=1200,
    local_iterations=300,
    finetune_iterations=200,
    val_every=10,
    labelled_volumes=(1, 2),
    combinations=("c1", "c2", "c3"),
)
QUICK = DemoPlan(
    volumes=24,
    phantom_size=80,
    widths=(8, 16, 32, 64, 64, 64),
    global_iterations=400,
    local_iterations=50,
    finetune_iterations=80,
    val_every=10,
    labelled_volumes=(1, 2),
    combinations=("c1",),
)

GLOBAL, LOCAL = "GD", "LD"
INITS = {"random": "random", GLOBAL: "encoder", f"{GLOBAL}+{LOCAL}": "encoder+decoder"}


def _data_config(root: Path, plan: DemoPlan) -> DataConfig:
    if plan.image_size is None:
        return DataConfig(dataset="phantom", root=str(root))
    # keep the field of view of the phantom reader's default grid
    spacing = PhantomReader.default_spacing[0] * PhantomReader.default_size[0] / plan.image_size
    return DataConfig(
        dataset="phantom",
        root=str(root),
        size=[plan.image_size, plan.image_size],
        target_spacing=[spacing, spacing],
    )


def run_demo(
    out: str | Path, quick: bool = False, device: str = "auto", plan: DemoPlan | None = None
) -> list[dict[str, object]]:
    """Run everything into ``out``; return the rows written to ``results.json``.

    ``plan`` replaces the full or quick settings (the tests use a tiny one).
    """
    started = time.perf_counter()
    plan = plan or (QUICK if quick else FULL)
    out = Path(out)
    reused = sorted(p.name for p in out.glob("*-*") if (p / "weights.safetensors").exists())
    root = out / "data" / "phantom"
    if not (root / "patient001").exists():
        write_phantom_dataset(root, volumes=plan.volumes, size=plan.phantom_size, seed=0)
    data = _data_config(root, plan)
    print(prepare_dataset(data).summary())
    global_dir, local_dir = _pretrain(out, plan, data, device)
    pretrained = {"random": "", GLOBAL: str(global_dir), f"{GLOBAL}+{LOCAL}": str(local_dir)}
    rows = [
        _finetune_and_evaluate(
            out, plan, data, pretrained[name], name, n, combination, seed, device
        )
        for seed, n, combination, name in itertools.product(
            plan.seeds, plan.labelled_volumes, plan.combinations, INITS
        )
    ]
    fileio.write_json(out / "results.json", rows)
    _draw_figures(out, plan, data, global_dir, local_dir, device)
    wall = time.perf_counter() - started
    environment = (
        f"{'quick' if quick else 'full'} demo, {resolve_device(device)}, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    if reused:
        environment += f"; {len(reused)} stage runs finished by an earlier invocation were reused"
    table = write_report(out, rows, dataclasses.asdict(plan), wall, environment)
    print(table)
    print(f"\nwall time {wall / 60:.1f} min; results in {out / 'results.json'}")
    print(f"report with figures in {out / 'report.md'}")
    return rows


def _optim(iterations: int, batch_size: int = 12) -> OptimConfig:
    return OptimConfig(iterations=iterations, batch_size=batch_size, checkpoint_every=100)


def _pretrain(out: Path, plan: DemoPlan, data: DataConfig, device: str) -> tuple[Path, Path]:
    """Stage 1 (G^D) and stage 2 (L^D on the frozen stage-1 encoder); return their run dirs."""
    model = ModelConfig(widths=list(plan.widths))
    global_dir = out / f"pretrain-global-{GLOBAL}"
    global_loss = GlobalLossConfig(strategy=GLOBAL, volumes_per_batch=plan.volumes_per_batch)
    run_pretrain_global(
        PretrainGlobalRun(data, model, global_loss, _optim(plan.global_iterations)),
        global_dir,
        device=device,
    )
    local_dir = out / f"pretrain-local-{GLOBAL}+{LOCAL}"
    local_loss = LocalLossConfig(strategy=LOCAL, volumes_per_batch=plan.volumes_per_batch)
    local_optim = _optim(plan.local_iterations, plan.local_batch)
    run_pretrain_local(
        PretrainLocalRun(data, model, local_loss, local_optim, encoder=str(global_dir)),
        local_dir,
        device=device,
    )
    return global_dir, local_dir


def _finetune_and_evaluate(
    out: Path,
    plan: DemoPlan,
    data: DataConfig,
    pretrained: str,
    name: str,
    labelled_volumes: int,
    combination: str,
    seed: int,
    device: str,
) -> dict[str, object]:
    """One fine-tuning run and its test scores, as a row of ``results.json``."""
    run_dir = out / f"finetune-{name}-{labelled_volumes}vol-{combination}-s{seed}"
    finetune = FinetuneConfig(
        labelled_volumes=labelled_volumes,  # type: ignore[arg-type]
        combination=combination,
        init=INITS[name],  # type: ignore[arg-type]
        pretrained=pretrained,
        val_every=plan.val_every,
    )
    config = FinetuneRun(
        data=data,
        model=ModelConfig(widths=list(plan.widths)),
        finetune=finetune,
        optim=_optim(plan.finetune_iterations, plan.finetune_batch),
        seed=seed,
    )
    run_finetune(config, run_dir, device=device)
    summary = evaluate_run(run_dir, device=device)
    return {
        "init": name,
        "labelled_volumes": labelled_volumes,
        "combination": combination,
        "seed": seed,
        "test_dice": summary.mean_dice,
        "per_class_dice": summary.per_class_dice,
        # JSON has no NaN: an undefined HD95 (one mask empty in every volume) is null
        "per_class_hd95_mm": {
            k: v if math.isfinite(v) else None for k, v in summary.per_class_hd95.items()
        },
        "run": run_dir.name,
    }


def _draw_figures(
    out: Path, plan: DemoPlan, data: DataConfig, global_dir: Path, local_dir: Path, device: str
) -> None:
    figures.loss_curves(
        {f"global ({GLOBAL})": global_dir, f"local ({LOCAL}, encoder frozen)": local_dir},
        out / "figures" / "pretraining_loss.png",
    )
    seed = plan.seeds[0]
    panels = {
        f"{n} labelled volume{'s' if n > 1 else ''}, {c}": {
            name: out / f"finetune-{name}-{n}vol-{c}-s{seed}" for name in INITS
        }
        for n in plan.labelled_volumes
        for c in plan.combinations
    }
    figures.validation_curves(
        panels, out / "figures" / "validation_dice.png", columns=len(plan.combinations)
    )
    rows = json.loads((out / "results.json").read_text())
    figures.dice_vs_labelled(rows, out / "figures" / "test_dice_vs_labelled.png")

    prepared, split = load_dataset(data)
    case = prepared.cases[split.test[0]]
    labelled = case.label if case.label is not None else np.zeros(case.image.shape[:1])
    slices = np.linspace(1, case.image.shape[0] - 2, 3).round().astype(int)
    n = plan.labelled_volumes[0]
    c = plan.combinations[0]
    predictions = {}
    for name in INITS:
        segmenter = Segmenter.from_pretrained(
            out / f"finetune-{name}-{n}vol-{c}-s{seed}", device=device
        )
        probs = slice_probabilities(segmenter.networks[0], case.image[slices], segmenter.device)
        predictions[f"{name} ({n} vol)"] = list(probs.argmax(1))
    figures.overlays(
        [case.image[s, 0] for s in slices],
        [labelled[s] for s in slices],
        predictions,
        out / "figures" / "test_overlays.png",
    )
