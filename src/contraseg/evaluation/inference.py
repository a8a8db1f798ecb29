"""Whole-volume prediction, mapped back to the native grid as the paper scores it.

A volume is predicted slice by slice on the preprocessed grid; the softmax maps are taken back
through the inverse preprocessing (un-crop, bilinear resize to the native in-plane shape) and
only then turned into labels by argmax (method_spec 6.3).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from contraseg.data.cache import PreparedCase
from contraseg.data.preprocess import probabilities_to_native
from contraseg.evaluation.metrics import dice_per_class


@torch.no_grad()
def predict_probabilities(
    model: nn.Module, image: np.ndarray, device: torch.device, batch_size: int = 32
) -> np.ndarray:
    """Softmax maps (Z, K, H, W) float32 of a prepared volume (Z, C, H, W)."""
    was_training = model.training
    model.eval()
    outputs = []
    use_autocast = device.type == "cuda"
    for start in range(0, image.shape[0], batch_size):
        chunk = torch.from_numpy(np.array(image[start : start + batch_size], dtype=np.float32))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            logits = model(chunk.to(device))
        outputs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(outputs)


def predict_native(model: nn.Module, case: PreparedCase, device: torch.device) -> np.ndarray:
    """Label map (X, Y, Z) of one case on its native grid."""
    return probabilities_to_native(predict_probabilities(model, case.image, device), case.grid)


def validation_dice(
    model: nn.Module, cases: Sequence[PreparedCase], num_classes: int, device: torch.device
) -> float:
    """The paper's selection score: mean over cases of the mean foreground 3-D Dice."""
    scores = [
        float(
            np.mean(
                dice_per_class(predict_native(model, case, device), case.native_label, num_classes)
            )
        )
        for case in cases
    ]
    return float(np.mean(scores))
