"""Tiny grids on the shared tiny phantom, written as YAML files; a tiny Cityscapes dataset."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

TINY_GRID: dict = {
    "title": "tiny grid",
    "data": {"dataset": "phantom", "size": [32, 32], "target_spacing": [3.0, 3.0]},
    "model": {"widths": [4, 8, 8, 8, 8, 8], "g1_hidden": 32, "g1_out": 16, "g2_out": 16},
    "pretrain_global": {"loss": {"volumes_per_batch": 2}, "optim": {"iterations": 3}},
    "pretrain_local": {
        "loss": {"strategy": "LD", "volumes_per_batch": 2},
        "optim": {"iterations": 3, "batch_size": 4},
    },
    "finetune": {"finetune": {"val_every": 2}, "optim": {"iterations": 4, "batch_size": 4}},
    "initialisations": [
        {"name": "random"},
        {"name": "G^R", "pretrain_global": {"loss": {"strategy": "GR"}}},
        {"name": "G^D", "pretrain_global": {}},
        {"name": "G^D + L^D", "pretrain_global": {}, "pretrain_local": {}},
    ],
    "labelled_volumes": [1, 2],
    "combinations": ["c1"],
    "seeds": [0],
}


@pytest.fixture(scope="session")
def write_tiny_grid(phantom_root):
    """``write_tiny_grid(folder, **changes)``: the path of a tiny grid on the shared phantom,
    written into ``folder``, with top-level keys replaced by ``changes``."""

    def make(folder: Path, name: str = "grid.yaml", **changes: object) -> Path:
        grid = copy.deepcopy(TINY_GRID)
        grid["data"].update(
            {"root": str(phantom_root), "cache": str(phantom_root / ".contraseg-cache")}
        )
        grid.update(changes)
        path = folder / name
        path.write_text(yaml.safe_dump(grid, sort_keys=False))
        return path

    return make


@pytest.fixture
def tiny_grid(tmp_path, write_tiny_grid):
    """``tiny_grid(**changes)``: :func:`write_tiny_grid` into the test's folder."""
    return lambda name="grid.yaml", **changes: write_tiny_grid(tmp_path, name, **changes)
