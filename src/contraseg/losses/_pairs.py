"""Which rows of a batch are views of one image, or the same partition of different volumes.

Shared by the global and the local loss: both need the same "positive" relation between
images and the same validation of the id vectors, and keeping one copy keeps them consistent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

IdLike = Tensor | Sequence[int]


def as_ids(ids: IdLike, batch: int, name: str, device: torch.device) -> Tensor:
    """``ids`` as a (batch,) long tensor on ``device``; ValueError naming ``name`` otherwise."""
    tensor = torch.as_tensor(ids, device=device)
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"{name} must be integers, got dtype {tensor.dtype}")
    if tensor.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(tensor.shape)}")
    return tensor.long()


def relation_masks(
    image_ids: IdLike,
    volume_ids: IdLike | None,
    partition_ids: IdLike | None,
    batch: int,
    device: torch.device,
    needs_partitions: bool,
    strategy: str,
) -> tuple[Tensor, Tensor]:
    """(same_image, cross_volume_partner), both (batch, batch) bool with a False diagonal.

    ``same_image[a, k]``: k is another view of a's image. ``cross_volume_partner[a, k]``: k is
    from the same partition of a different volume (all False when partitions are not needed).
    Rows sharing an image id must share volume and partition ids, else ValueError: that is a
    batch-assembly bug that would silently make an image its own negative.
    """
    images = as_ids(image_ids, batch, "image_ids", device)
    eye = torch.eye(batch, dtype=torch.bool, device=device)
    same_image = (images[:, None] == images[None, :]) & ~eye
    partner = torch.zeros_like(same_image)
    if needs_partitions:
        if volume_ids is None or partition_ids is None:
            raise ValueError(f"strategy {strategy!r} needs volume_ids and partition_ids")
        volumes = as_ids(volume_ids, batch, "volume_ids", device)
        partitions = as_ids(partition_ids, batch, "partition_ids", device)
        same_volume = volumes[:, None] == volumes[None, :]
        same_partition = partitions[:, None] == partitions[None, :]
        if (same_image & ~(same_volume & same_partition)).any():
            raise ValueError("rows with the same image_id have different volume or partition ids")
        partner = same_partition & ~same_volume
    return same_image, partner
