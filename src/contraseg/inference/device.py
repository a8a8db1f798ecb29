"""Device choice shared by training and inference."""

from __future__ import annotations

import torch

from contraseg.errors import InputError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; asking for CUDA without one is an error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(None, f"--device {name} was asked for but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(
            None, f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)"
        ) from None
