"""Each contrastive loss falls clearly below its chance level after enough iterations on the
phantom. This is what pre-training must do; whether it then helps segmentation is a
measurement (the demo reports it), never asserted here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from contraseg.config import PretrainGlobalRun, PretrainLocalRun
from contraseg.training.stages import run_pretrain_global, run_pretrain_local

# Wider than the other tests' tiny network: the global loss needs some capacity to leave chance.
LEARNING = ["model.widths=[8,16,32,32,32,32]", "model.g1_hidden=128", "model.g1_out=32"]


def _losses(run_dir) -> tuple[np.ndarray, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return np.array([row["loss"] for row in rows]), rows[0]["chance"]


def _global_run(tiny_config, out, strategy: str, iterations: int):
    config = tiny_config(
        PretrainGlobalRun,
        *LEARNING,
        f"loss.strategy={strategy}",
        "loss.volumes_per_batch=4",
        f"optim.iterations={iterations}",
    )
    return run_pretrain_global(config, out)


@pytest.fixture(scope="module")
def global_gd(tmp_path_factory, tiny_config):
    return _global_run(tiny_config, tmp_path_factory.mktemp("learn") / "GD", "GD", 600)


def _assert_leaves_chance(run_dir) -> None:
    losses, chance = _losses(run_dir)
    assert losses[:10].mean() > 0.95 * chance  # an untrained encoder is no better than chance
    assert losses[-50:].mean() < 0.9 * chance, (losses[-50:].mean(), chance)


@pytest.mark.slow
def test_gd_loss_falls_below_chance(global_gd):
    _assert_leaves_chance(global_gd)


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "iterations"), [("GR", 600), ("GD-", 600)])
def test_global_loss_falls_below_chance(tiny_config, tmp_path, strategy, iterations):
    _assert_leaves_chance(_global_run(tiny_config, tmp_path, strategy, iterations))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["LR", "LD"])
def test_local_loss_falls_below_chance(tiny_config, tmp_path, global_gd, strategy):
    config = tiny_config(
        PretrainLocalRun,
        *LEARNING,
        f"loss.strategy={strategy}",
        "loss.volumes_per_batch=4",
        "optim.batch_size=8",
        "optim.iterations=40",
        f"encoder={global_gd}",
    )
    losses, chance = _losses(run_pretrain_local(config, tmp_path / strategy))
    # A random decoder on a pre-trained encoder already starts below chance: only the end counts.
    assert losses[-10:].mean() < 0.5 * chance, (losses[0], losses[-10:].mean(), chance)
