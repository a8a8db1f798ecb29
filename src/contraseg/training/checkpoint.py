"""Checkpoints that load with ``torch.load(weights_only=True)`` and weights as safetensors.

A checkpoint holds tensors and primitives only (no pickled classes), so that it still loads
under torch's safe default. Both kinds of file are written atomically: an interrupted save
leaves the previous file intact.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from contraseg.errors import InputError
from contraseg.fileio import atomic_path


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        raise InputError(path, f"cannot load checkpoint: {str(err).splitlines()[0]}") from None


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "weights file not found (did that stage finish?)")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise InputError(path, f"cannot load weights: {err}") from None
