"""Host tensors onto the device without waiting for it."""

from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(
    tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``tensor``, built or drawn on the host, on ``device`` (as ``dtype``, if given).

    A plain copy to a GPU from pageable memory waits for every kernel queued before it; a copy
    from pinned memory with ``non_blocking`` does not, so the host goes on queueing work while
    the GPU computes (docs/training.md, "Speed and several GPUs"). The pinned buffer comes from
    PyTorch's caching host allocator, which keeps it until the copy has run.
    """
    if dtype is not None:
        tensor = tensor.to(dtype=dtype)
    if tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
