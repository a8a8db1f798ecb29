"""A run killed with SIGKILL (no chance to clean up) resumes to the same weights as a run that
was never interrupted (docs/reliability.md): checkpoints are atomic and hold every generator."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from child_process import child_env
from safetensors.torch import load_file

from contraseg.config import PretrainGlobalRun, save_config

ITERATIONS = 12


def _command(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "contraseg.cli", "pretrain-global", "--config", str(config),
            "--out", str(out), "--device", "cpu"]  # fmt: skip


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_weights(tiny_config, tmp_path) -> None:
    config = tmp_path / "tiny.yaml"
    save_config(
        tiny_config(
            PretrainGlobalRun,
            f"optim.iterations={ITERATIONS}",
            "optim.checkpoint_every=2",
            "loss.volumes_per_batch=2",
        ),
        config,
    )
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_command(config, whole), env=child_env(), check=True, capture_output=True)

    kills = 0
    checkpoint = killed / "checkpoints" / "last.pt"
    while kills < 2:  # kill it twice, each time after it saved something new
        seen = checkpoint.stat().st_mtime_ns if checkpoint.exists() else 0
        process = subprocess.Popen(
            _command(config, killed), env=child_env(), stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if checkpoint.exists() and checkpoint.stat().st_mtime_ns != seen:
                break
            time.sleep(0.01)
        if process.poll() is not None:  # finished before we could kill it
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    subprocess.run(_command(config, killed), env=child_env(), check=True, capture_output=True)

    assert kills >= 1
    first = load_file(str(whole / "weights.safetensors"))
    second = load_file(str(killed / "weights.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
