"""The training loop shared by the three stages, with the hooks each stage fills in.

A :class:`Trainer` owns what every stage needs and nothing stage-specific: the run directory
(``config.yaml``, ``metrics.jsonl``, TensorBoard events, ``checkpoints/last.pt``, final weights
as safetensors), resuming from the last checkpoint, bf16 autocast on CUDA, a progress bar, and
a guard that stops the run when the loss is no longer finite. A stage subclasses it and
overrides the hooks, in the manner of nnU-Net's trainer:

- :meth:`setup` builds ``self.model`` (every module whose state is checkpointed) and
  ``self.optimizer``;
- :meth:`compute_loss` draws a batch and returns the loss of one iteration with scalars to log;
- :meth:`validate` (optional) scores the model and returns scalars to log;
- :meth:`final_weights` says which tensors are the stage's product.

All randomness flows from three generators seeded by ``config.seed`` and saved in every
checkpoint (numpy for sampling, a torch generator for augmentation, torch's global generator for
initialisation), so that a resumed run on the CPU ends with the same weights as an uninterrupted
one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from contraseg import config as config_module
from contraseg.errors import InputError, TrainingError
from contraseg.inference.device import resolve_device
from contraseg.training.checkpoint import load_checkpoint, save_checkpoint, save_weights

# Keys of a run's config that may change between a run and its resumption.
RESUMABLE_CHANGES = {"optim.iterations", "optim.checkpoint_every", "optim.log_every"}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Trainer:
    """Base class of the stages; see the module docstring for the hooks."""

    stage = "train"

    def __init__(self, config: Any, run_dir: str | Path, device: str = "auto") -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.device = resolve_device(device)
        self.iteration = 0
        self.rng = np.random.default_rng(config.seed)
        self.augment_generator = torch.Generator().manual_seed(config.seed + 1)
        torch.manual_seed(config.seed)
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer
        self._writer: Any = None
        self._saved_iteration = 0

    # ---- hooks --------------------------------------------------------------------------

    def setup(self) -> None:
        raise NotImplementedError

    def compute_loss(self, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def validate(self, iteration: int) -> dict[str, float] | None:
        return None

    def should_validate(self, iteration: int) -> bool:
        return False

    def final_weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def extra_state(self) -> dict[str, Any]:
        """Stage-specific state to checkpoint (tensors and primitives only)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved."""

    # ---- paths ---------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def weights_path(self) -> Path:
        return self.run_dir / "weights.safetensors"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    # ---- the loop -----------------------------------------------------------------------

    def run(self, fresh: bool = False) -> Path:
        """Train to ``config.optim.iterations`` (resuming if possible); return the run dir."""
        self._prepare_run_dir(fresh)
        self.setup()  # bad input fails here, before the run directory is written to
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_module.save_config(self.config, self.run_dir / "config.yaml")
        self.model.to(self.device)
        if self.checkpoint_path.exists():
            self._restore(load_checkpoint(self.checkpoint_path))
            self._saved_iteration = self.iteration
        self._truncate_metrics(self.iteration)
        optim = self.config.optim
        try:
            self._loop(optim.iterations, optim.checkpoint_every, optim.log_every)
        finally:
            if self._writer is not None:
                self._writer.close()
        save_weights(self.weights_path, self.final_weights())
        return self.run_dir

    def _loop(self, iterations: int, checkpoint_every: int, log_every: int) -> None:
        use_autocast = self.device.type == "cuda"
        bar = tqdm(
            total=iterations, initial=self.iteration, desc=self.stage, unit="it", dynamic_ncols=True
        )
        try:
            while self.iteration < iterations:
                iteration = self.iteration + 1
                self.model.train()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                    loss, stats = self.compute_loss(iteration)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(
                        f"{self.stage}: the loss became {value} at iteration {iteration}; "
                        f"stopped. The last good checkpoint is kept in {self.checkpoint_path}"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.iteration = iteration
                stats = {"loss": value, **stats}
                validated = self.should_validate(iteration) or iteration == iterations
                if validated:
                    stats.update(self.validate(iteration) or {})
                if validated or iteration % log_every == 0 or iteration == 1:
                    self.log(iteration, stats)
                if iteration % checkpoint_every == 0 or iteration == iterations:
                    self._save()
                bar.set_postfix({k: f"{v:.4f}" for k, v in stats.items()}, refresh=False)
                bar.update(1)
        except KeyboardInterrupt:
            bar.close()
            print(
                f"{self.stage}: interrupted at iteration {self.iteration}; the same command "
                f"resumes from the checkpoint at iteration {self._saved_iteration}"
            )
            raise
        bar.close()

    # ---- logging ------------------------------------------------------------------------

    def log(self, iteration: int, stats: dict[str, float]) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps({"iteration": iteration, **stats}) + "\n")
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        for key, value in stats.items():
            self._writer.add_scalar(f"{self.stage}/{key}", value, iteration)

    def _truncate_metrics(self, iteration: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be redone)."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines()
        kept = [line for line in lines if line and json.loads(line)["iteration"] <= iteration]
        if len(kept) != len(lines):
            self.metrics_path.write_text("".join(f"{line}\n" for line in kept))

    # ---- run directory and checkpoints ----------------------------------------------------

    def _prepare_run_dir(self, fresh: bool) -> None:
        """``--fresh``: clear the run directory; else refuse to resume under another config.

        Without a checkpoint there is nothing to resume, so a directory left by a run that
        failed before its first checkpoint is simply reused.
        """
        if fresh and self.run_dir.exists():
            for name in ("checkpoints", "tensorboard", "evaluation"):
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
            for path in self.run_dir.glob("*"):
                if path.is_file():
                    path.unlink()
        elif self.checkpoint_path.exists():
            self._check_same_config(self.run_dir / "config.yaml")

    def _check_same_config(self, config_path: Path) -> None:
        previous = config_module.load_config(type(self.config), config_path)
        old = _flatten(dataclasses.asdict(previous))
        new = _flatten(dataclasses.asdict(self.config))
        changed = sorted(k for k in old if old[k] != new[k] and k not in RESUMABLE_CHANGES)
        if changed:
            key = changed[0]
            raise InputError(
                config_path,
                f"this run directory holds a run with {key}={old[key]!r}, not {new[key]!r}; "
                "pass --fresh to start over or choose another --out",
            )

    def _save(self) -> None:
        state = {
            "stage": self.stage,
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng_numpy": self.rng.bit_generator.state,
            "rng_augment": self.augment_generator.get_state(),
            "rng_torch": torch.get_rng_state(),
            "extra": self.extra_state(),
        }
        save_checkpoint(self.checkpoint_path, state)
        self._saved_iteration = self.iteration

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("stage") != self.stage:
            raise InputError(
                self.checkpoint_path,
                f"checkpoint of stage {state.get('stage')!r}, not {self.stage!r}",
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng_numpy"]
        self.augment_generator.set_state(state["rng_augment"])
        torch.set_rng_state(state["rng_torch"])
        self.iteration = int(state["iteration"])
        self.load_extra_state(state["extra"])
