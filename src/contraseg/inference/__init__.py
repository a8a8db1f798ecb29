"""Inference: model bundles, the :class:`Segmenter`, scan I/O and folder prediction.

Imports nothing from ``contraseg.training``: a model folder and this package are all that
prediction needs.
"""

from contraseg.inference.bundle import (
    Architecture,
    ModelBundle,
    Preprocessing,
    Provenance,
    load_bundle,
    read_bundle,
)
from contraseg.inference.device import resolve_device
from contraseg.inference.predict import PredictReport, predict_to_folder
from contraseg.inference.predictor import Prediction, Segmenter, slice_probabilities

__all__ = [
    "Architecture",
    "ModelBundle",
    "PredictReport",
    "Prediction",
    "Preprocessing",
    "Provenance",
    "Segmenter",
    "load_bundle",
    "predict_to_folder",
    "read_bundle",
    "resolve_device",
    "slice_probabilities",
]
