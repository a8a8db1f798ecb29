"""Checkpoints that load with ``torch.load(weights_only=True)`` and weights as safetensors.

A checkpoint holds tensors and primitives only (no pickled classes), so that it still loads
under torch's safe default. Both kinds of file are written atomically: an interrupted save
leaves the previous file intact. :func:`schema_problem` and :func:`first_non_finite` let the
trainer refuse a damaged checkpoint before it touches any state (docs/training.md).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
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


def load_checkpoint(path: str | Path) -> Any:
    """The unpickled content of ``path``; its structure is the caller's to check.

    Any failure is the file's fault (empty, truncated, not a checkpoint, a class the safe
    unpickler refuses), and torch raises a different exception type for each (EOFError,
    KeyError, RuntimeError, UnpicklingError...), hence the broad catch.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises weights_only=False: not here
        detail = "not written by torch.save, or it holds objects that the safe loader refuses"
    except Exception as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise InputError(path, f"cannot load checkpoint: {detail}")


def _kind(value: Any) -> str:
    return type(value).__name__


def schema_problem(template: Any, value: Any, where: str = "") -> str | None:
    """What keeps ``value`` from having the structure of ``template``, or None.

    The same keys (recursively), the same types (an int is not a bool nor a float), tensors of
    the same shape and dtype: what a state saved by this code, now, would hold. ``where``
    prefixes the dotted path of the first difference in the message.
    """
    name = where or "the checkpoint"
    if isinstance(template, dict):
        if not isinstance(value, dict):
            return f"{name} is {_kind(value)}, expected dict"
        missing = [k for k in template if k not in value]
        if missing:
            return f"{name} lacks {', '.join(repr(k) for k in missing[:3])}"
        unexpected = [k for k in value if k not in template]
        if unexpected:
            return f"{name} has unexpected {', '.join(repr(k) for k in unexpected[:3])}"
        for key, item in template.items():
            problem = schema_problem(item, value[key], f"{where}.{key}" if where else str(key))
            if problem:
                return problem
        return None
    if type(value) is not type(template):
        return f"{name} is {_kind(value)}, expected {_kind(template)}"
    if isinstance(template, torch.Tensor):
        if value.shape != template.shape:
            return f"{name} has shape {tuple(value.shape)}, expected {tuple(template.shape)}"
        if value.dtype != template.dtype:
            return f"{name} is {value.dtype}, expected {template.dtype}"
    return None


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None.

    One host synchronisation for all of them, so that it can run on a GPU at every checkpoint.
    """
    names = [k for k, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not names:
        return None
    device = tensors[names[0]].device
    finite = torch.stack([torch.isfinite(tensors[k]).all().to(device) for k in names]).cpu()
    if bool(finite.all()):
        return None
    return names[int((~finite).nonzero()[0, 0])]


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
