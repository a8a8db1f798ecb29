"""``--dry-run``: the runs of a grid, what each needs, and an estimate of the time they take,
from iterations per second measured on this machine by a short probe of each stage.

The probe builds each stage's trainer on the grid's data and sizes in a temporary folder, runs
a few iterations to warm up, then times a few more (and one validation of fine-tuning). Stage 2
is probed on a random encoder and fine-tuning from random weights: their cost per iteration
does not depend on the weights. Loading, preparing and the first iterations are left out of
the measure; the result is an estimate, printed as one.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from contraseg.data.cache import PreparedDataset
from contraseg.experiment.plan import LEVELS, Plan, Run, last_iteration, run_state
from contraseg.inference import resolve_device
from contraseg.models.unet import partial_state_dict
from contraseg.training.checkpoint import save_weights
from contraseg.training.joint import JointPretrainer
from contraseg.training.pretext import PretextPretrainer
from contraseg.training.stages import Finetuner, GlobalPretrainer, LocalPretrainer, build_unet
from contraseg.training.trainer import Trainer

__all__ = ["Speed", "describe_plan", "estimate", "probe"]

WARMUP = 2
TIMED = 3
TRAINERS: dict[str, type[Trainer]] = {
    "pretrain-global": GlobalPretrainer,
    "pretrain-joint": JointPretrainer,
    "pretrain-pretext": PretextPretrainer,
    "pretrain-local": LocalPretrainer,
    "finetune": Finetuner,  # a self-training round costs as much per iteration
}


@dataclass(frozen=True)
class Speed:
    """Measured seconds per iteration; fine-tuning adds one validation and an evaluation."""

    iteration_s: float
    validation_s: float = 0.0
    evaluation_s: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_iterations(trainer: Trainer) -> float:
    trainer.setup()
    trainer.model.to(trainer.device)
    use_autocast = trainer.device.type == "cuda"
    for step in range(WARMUP + TIMED):
        if step == WARMUP:
            _sync(trainer.device)
            started = time.perf_counter()
        trainer.model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            loss, _ = trainer.compute_loss(step + 1)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
    _sync(trainer.device)
    return (time.perf_counter() - started) / TIMED


def probe(
    runs: Sequence[Run], prepared: PreparedDataset, test_cases: int, device: str
) -> dict[str, Speed]:
    """Speed of each pre-training run in ``runs``, and of fine-tuning (under the key
    ``finetune``, from the first fine-tuning run; its evaluation of ``test_cases`` volumes is
    estimated from the validation's time per volume), measured on ``device``."""
    speeds: dict[str, Speed] = {}
    with tempfile.TemporaryDirectory(prefix="contraseg-probe-") as tmp:
        folder = Path(tmp)
        encoder = folder / "encoder"
        for run in runs:
            config = run.config
            if run.stage == "finetune":
                if "finetune" in speeds:
                    continue
                random = dataclasses.replace(config.finetune, init="random", pretrained="")
                config = dataclasses.replace(config, finetune=random)
            elif run.stage == "pretrain-local":
                if not encoder.exists():
                    unet = build_unet(config.model, prepared)
                    save_weights(encoder / "weights.safetensors", partial_state_dict(unet))
                config = dataclasses.replace(config, encoder=str(encoder))
            trainer = TRAINERS[run.stage](config, folder / "run", device)
            iteration_s = _time_iterations(trainer)
            if run.stage != "finetune":
                speeds[run.name] = Speed(iteration_s)
                continue
            assert isinstance(trainer, Finetuner)
            started = time.perf_counter()
            trainer.validate(1)
            validation_s = time.perf_counter() - started
            per_case = validation_s / max(1, len(trainer.val_cases))
            speeds["finetune"] = Speed(iteration_s, validation_s, per_case * test_cases)
    return speeds


def estimate(plan: Plan, run: Run, speeds: dict[str, Speed]) -> float:
    """Seconds still needed by ``run`` at the measured speeds (0 when finished)."""
    state = run_state(run, plan.out)
    if state == "finished":
        return 0.0
    speed = speeds["finetune" if run.stage == "finetune" else run.name]
    if state == "trained":
        return speed.evaluation_s
    remaining = max(0, run.iterations - last_iteration(plan.out / run.name))
    seconds = remaining * speed.iteration_s
    if run.stage == "finetune":
        validations = remaining // run.config.finetune.val_every + 1
        seconds += validations * speed.validation_s + speed.evaluation_s
    return seconds


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def describe_plan(
    plan: Plan,
    mine: Sequence[Run],
    speeds: dict[str, Speed] | None,
    device: str,
    workers: int,
    say: Callable[[str], None] = print,
) -> None:
    """Print every run of the plan (those of this invocation marked ``*``) with its state and
    needs, then the time estimate."""
    chosen = {run.name for run in mine}
    width = max(len(run.name) for run in plan.runs) + 2
    for stage in LEVELS:
        runs = plan.level(stage)
        if not runs:
            continue
        say(f"{stage}: {len(runs)} run(s)")
        for run in runs:
            mark = "*" if run.name in chosen and len(chosen) < len(plan.runs) else " "
            needs = f"needs {', '.join(run.needs)}" if run.needs else ""
            state = run_state(run, plan.out)
            say(f" {mark}{run.name:<{width}}{state:<10}{run.iterations:>7} it  {needs}".rstrip())
    if speeds is None:
        return
    where = resolve_device(device)
    say(
        f"\nestimate for the runs of this invocation, from {TIMED} timed iterations after "
        f"{WARMUP} warm-up per stage on {where} (loading and preparing not counted):"
    )
    levels: dict[str, float] = {}
    for run in mine:
        seconds = estimate(plan, run, speeds)
        levels[run.stage] = levels.get(run.stage, 0.0) + seconds
    for name, speed in speeds.items():
        line = f"  {name:<{width}}{speed.iteration_s:.3f} s/iteration"
        if name == "finetune":
            line += (
                f", one validation {speed.validation_s:.1f} s, "
                f"evaluation about {speed.evaluation_s:.1f} s per run"
            )
        say(line)
    total = sum(levels.values())
    for stage, seconds in levels.items():
        say(f"  {stage}: {_duration(seconds)}")
    parallel = sum(seconds / max(1, workers) for seconds in levels.values())
    say(
        f"  total: {_duration(total)} of compute"
        + (
            f"; with {workers} workers about {_duration(parallel)} (levels run in order)"
            if workers > 1
            else ""
        )
    )
