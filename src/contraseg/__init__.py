"""contraseg: global and local contrastive pre-training for segmentation with few labels.

PyTorch implementation of Chaitanya et al., "Contrastive learning of global and local
features for medical image segmentation with limited annotations" (NeurIPS 2020).

``from contraseg import Segmenter`` is the Python entry point for prediction
(:mod:`contraseg.inference`); it is imported on first use, so that ``import contraseg`` (and the
command line's start-up) does not load torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Segmenter", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Segmenter":
        from contraseg.inference import Segmenter

        return Segmenter
    raise AttributeError(f"module 'contraseg' has no attribute {name!r}")
