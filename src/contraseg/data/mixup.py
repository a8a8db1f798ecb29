"""Mixup of a fine-tuning batch (Zhang et al., "mixup: Beyond empirical risk minimization",
ICLR 2018), as the supplement combines it with the proposed initialisation (Table 8).

Each image is mixed with a partner from a random permutation of the batch,
``x = lam * x_i + (1 - lam) * x_perm(i)``, and its one-hot label map with the *same* ``lam``.
``lam`` is drawn per image from Beta(alpha, alpha) and replaced by ``max(lam, 1 - lam)``, so that
image i stays the larger part of slot i (as in MixMatch); Beta(alpha, alpha) is symmetric, so
the pairs that get mixed, and how much, are distributed as in Zhang et al. With alpha -> 0 every
``lam`` is 1 and the batch is unchanged. docs/extensions.md has the details.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from contraseg.devices import to_device


def sample_mixup(batch: int, alpha: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(lam, perm): per-image weights in [0.5, 1] (float32, (B,)) and a permutation (B,), drawn
    on the CPU from ``generator`` (the run's augmentation generator, saved in checkpoints).

    torch's Beta distribution takes no generator, so a numpy generator seeded from
    ``generator`` draws the weights: the same draws for a seed, on any device.
    """
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be positive, got {alpha}")
    seed = int(torch.randint(2**62, (1,), generator=generator))
    lam = np.random.default_rng(seed).beta(alpha, alpha, size=batch)
    lam = np.maximum(lam, 1.0 - lam)
    perm = torch.randperm(batch, generator=generator)
    return torch.from_numpy(lam.astype(np.float32)), perm


def mixup(
    images: Tensor,
    target: Tensor,
    lam: Tensor,
    perm: Tensor,
    ignore: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Mix images (B, C, H, W) and class probabilities (B, K, H, W) with the same ``lam``.

    A pixel is ignored where either of its two sources is ignored (its mixed label is unknown).
    """
    if target.ndim != 4 or not target.dtype.is_floating_point:
        raise ValueError(f"mixup needs (B, K, H, W) class probabilities, got {target.dtype}")
    if not images.shape[0] == target.shape[0] == lam.shape[0] == perm.shape[0]:
        raise ValueError("images, target, lam and perm must share the batch size")
    weight = to_device(lam, images.device, torch.float32).view(-1, 1, 1, 1)
    perm = to_device(perm, images.device)
    mixed = (weight * images + (1 - weight) * images[perm]).to(images.dtype)
    mixed_target = weight * target + (1 - weight) * target[perm]
    mixed_ignore = None if ignore is None else ignore | ignore[perm]
    return mixed, mixed_target, mixed_ignore
