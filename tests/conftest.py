"""A tiny phantom dataset and tiny configs shared by the training and evaluation tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from contraseg.config import load_config
from contraseg.data.phantom import write_phantom_dataset

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core; more torch threads than cores thrash.
    torch.set_num_threads(1)

TINY = [
    "data.dataset=phantom",
    "data.size=[32,32]",
    "data.target_spacing=[3.0,3.0]",
    "model.widths=[4,8,8,8,8,8]",
    "model.g1_hidden=32",
    "model.g1_out=16",
    "model.g2_out=16",
    "optim.log_every=1",
]


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """The easy preset: the learning tests' tiny networks and budgets were sized on it."""
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, volumes=24, size=48, seed=3, preset="easy")
    return root


@pytest.fixture(scope="session")
def tiny_config(phantom_root):
    """``tiny_config(RunClass, *overrides)``: a config on the shared tiny phantom."""
    cache = phantom_root / ".contraseg-cache"

    def make(cls, *overrides: str):
        return load_config(
            cls, None, [*TINY, f"data.root={phantom_root}", f"data.cache={cache}", *overrides]
        )

    return make
