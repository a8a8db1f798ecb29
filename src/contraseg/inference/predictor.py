"""The :class:`Segmenter`: one trained model (or an ensemble) applied to whole volumes.

It is the only inference path of contraseg: fine-tuning's validation, ``contraseg evaluate``,
``contraseg predict``, the demo and the Python API all go through it, as nnU-Net's trainer
validates with its ``nnUNetPredictor``. It needs no training code: a bundle
(:mod:`contraseg.inference.bundle`) or a live network with its bundle is enough.

Per volume and model: keep the channels the model takes, orient as the model's reader did,
preprocess (normalise, resample in-plane, crop or pad), run the slices through the network in
batches, optionally average over flips (TTA), take the softmax back to the native grid (un-crop,
bilinear resize) and un-orient it; then average over the ensemble there, take the argmax and
map class indices to the dataset's label values (docs/inference.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from contraseg import fileio
from contraseg.data.cache import PreparedCase
from contraseg.data.orientation import orient, unorient
from contraseg.data.preprocess import (
    IntensityProfile,
    PreprocessParams,
    check_resampled_size,
    preprocess_volume,
    probabilities_to_native,
    unusual_intensity,
)
from contraseg.data.volume import Volume
from contraseg.errors import InputError
from contraseg.inference.bundle import ModelBundle, load_bundle
from contraseg.inference.device import resolve_device
from contraseg.inference.io import Scan, ScanFiles, label_dtype, read_scan, write_label_map

logger = logging.getLogger(__name__)

# flips of the two in-plane axes of a (B, C, H, W) batch averaged by test-time augmentation
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (2, 3))


def preprocess_params(bundle: ModelBundle) -> PreprocessParams:
    pre = bundle.preprocessing
    return PreprocessParams(
        pre.target_spacing, pre.size, pre.n4, pre.percentiles, pre.normalise_mask
    )


def _warn_if_unusual(image: np.ndarray, bundle: ModelBundle, source: Path | None) -> None:
    """One warning line when the scan's foreground fraction is far from the training cases'
    (a skull-stripped model on an unstripped scan, say: docs/own-data.md)."""
    references = [IntensityProfile(f) for f in bundle.preprocessing.foreground_fractions]
    message = unusual_intensity(IntensityProfile.of(image), references)
    if message:
        logger.warning("%s: %s", source or "input", message)


@torch.no_grad()
def slice_probabilities(
    network: nn.Module,
    image: np.ndarray,
    device: torch.device,
    batch_size: int = 32,
    tta: bool = False,
) -> np.ndarray:
    """Softmax maps (Z, K, H, W) float32 of a preprocessed volume (Z, C, H, W), batched.

    On CUDA the network runs under bf16 autocast (as in training); the softmax is taken in
    float32. The network's train/eval mode is restored afterwards, so validation can call this
    in the middle of training.
    """
    was_training = network.training
    network.eval()
    outputs = []
    flips = TTA_FLIPS if tta else ((),)
    for start in range(0, image.shape[0], batch_size):
        chunk = torch.from_numpy(np.array(image[start : start + batch_size], dtype=np.float32))
        chunk = chunk.to(device, non_blocking=True)
        total = None
        for dims in flips:
            autocast = (
                torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda"
                else contextlib.nullcontext()
            )
            with autocast:
                logits = network(chunk.flip(dims) if dims else chunk)
            probs = torch.softmax(logits.float(), dim=1)
            probs = probs.flip(dims) if dims else probs
            total = probs if total is None else total + probs
        assert total is not None
        outputs.append((total / len(flips) if tta else total).cpu().numpy())
    network.train(was_training)
    return np.concatenate(outputs)


@dataclass
class Prediction:
    """Labels on the input grid (label values) and, on request, the class probabilities."""

    labels: np.ndarray  # the input's spatial shape, uint8 or uint16
    probabilities: np.ndarray | None  # (K, *spatial shape) float32


def _model_input(image: np.ndarray, bundle: ModelBundle, source: Path | None) -> np.ndarray:
    """The channels of an (X, Y, Z, C) image that the model takes, or an error naming source.

    A model trained on one channel of 4-D images (``preprocessing.channel``, MSD Prostate's T2)
    keeps that channel of a multi-channel input and takes a one-channel input as it is.
    """
    channels = image.shape[3]
    want = bundle.architecture.in_channels
    pick = bundle.preprocessing.channel
    if pick is not None and channels > 1:
        if pick >= channels:
            raise InputError(source, f"has {channels} channels; the model uses channel {pick}")
        return image[..., pick : pick + 1]
    if channels != want:
        raise InputError(source, f"has {channels} channel(s); the model takes {want}")
    return image


class Segmenter:
    """Segment volumes with one model or an ensemble (softmax averaged on the native grid).

    Build it with :meth:`from_pretrained` from bundle folders (finished finetune runs), or
    directly from networks and their bundles (what fine-tuning's validation does).
    """

    def __init__(
        self,
        networks: Sequence[nn.Module],
        bundles: Sequence[ModelBundle],
        device: str | torch.device = "auto",
        tta: bool = False,
        batch_size: int = 32,
    ) -> None:
        if not networks or len(networks) != len(bundles):
            raise ValueError("give one bundle per network, at least one")
        if batch_size < 1:
            raise InputError("batch_size", f"must be at least 1, got {batch_size}")
        first = bundles[0]
        for bundle in bundles[1:]:
            if (bundle.class_names, bundle.label_values, bundle.absent_classes) != (
                first.class_names,
                first.label_values,
                first.absent_classes,
            ):
                raise InputError(
                    None, "the models of an ensemble must share their classes and label values"
                )
            if bundle.architecture.in_channels != first.architecture.in_channels:
                raise InputError(None, "the models of an ensemble must take the same channels")
        self.device = resolve_device(device)
        # channels-last, as in training: about 1.5x faster on the CPU too (BENCHMARKS.md)
        self.networks = [
            network.to(self.device, memory_format=torch.channels_last) for network in networks
        ]
        self.bundles = list(bundles)
        self.tta = tta
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls,
        paths: str | Path | Sequence[str | Path],
        device: str | torch.device = "auto",
        tta: bool = False,
        batch_size: int = 32,
    ) -> Segmenter:
        """Load one bundle folder (or ``model.json``), or several to ensemble them."""
        items = [paths] if isinstance(paths, str | Path) else list(paths)
        loaded = [load_bundle(path) for path in items]
        return cls([n for _, n in loaded], [b for b, _ in loaded], device, tta, batch_size)

    @property
    def bundle(self) -> ModelBundle:
        """The first model's bundle: classes and label values are shared by the ensemble."""
        return self.bundles[0]

    # -- on prepared (cached) volumes ---------------------------------------------------------

    def case_probabilities(self, case: PreparedCase) -> np.ndarray:
        """(X, Y, Z, K) softmax of a prepared case on its native (oriented) grid.

        The cache holds the volume preprocessed as the bundle says, so only the network and
        the inverse resampling run; an ensemble needs each member's own preprocessing and is
        refused here.
        """
        if len(self.networks) != 1:
            raise ValueError("prepared cases can only be predicted by a single model")
        probs = slice_probabilities(
            self.networks[0], case.image, self.device, self.batch_size, self.tta
        )
        return probabilities_to_native(probs, case.grid)

    def predict_case(self, case: PreparedCase) -> np.ndarray:
        """Class indices (X, Y, Z) of a prepared case on its native grid (for scoring)."""
        return self.case_probabilities(case).argmax(-1).astype(np.int16)

    # -- on scans ---------------------------------------------------------------------------

    def predict(
        self,
        image: np.ndarray,
        affine: np.ndarray,
        spacing: Sequence[float] | None = None,
        return_probabilities: bool = False,
    ) -> Prediction:
        """Segment one image given as (X, Y), (X, Y, Z) or (X, Y, Z, C) with its 4 x 4 affine.

        ``spacing`` (mm along X, Y, Z) defaults to the column norms of the affine. The labels
        come back on the input's grid and in its shape (without C), as the dataset's label
        values; the probabilities, on request, as (K, *that shape).
        """
        return self._predict(np.asarray(image), affine, spacing, return_probabilities, None)

    def _predict(
        self,
        image: np.ndarray,
        affine: np.ndarray,
        spacing: Sequence[float] | None,
        return_probabilities: bool,
        source: Path | None,
    ) -> Prediction:
        shape = image.shape[:3]
        if image.ndim == 2:
            image = image[:, :, None, None]
        elif image.ndim == 3:
            image = image[..., None]
        if image.ndim != 4:
            problem = f"expected (X, Y), (X, Y, Z) or (X, Y, Z, C), got shape {image.shape}"
            raise InputError(source, problem)
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise InputError(source, "the affine must be a finite 4 x 4 matrix")
        if spacing is None:
            spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise InputError(source, f"voxel spacing must be 3 positive values, got {spacing}")
        total = None
        for network, bundle in zip(self.networks, self.bundles, strict=True):
            data = _model_input(image, bundle, source).astype(np.float32, copy=False)
            _warn_if_unusual(data, bundle, source)
            rule = bundle.preprocessing.orientation
            oriented, oriented_affine, oriented_spacing = orient(data, affine, spacing, rule)
            volume = Volume(
                "input", oriented, None, oriented_spacing, oriented_affine, source or Path("input")
            )
            check_resampled_size(
                volume,
                bundle.preprocessing.target_spacing,
                max(volume.image.shape[3], bundle.architecture.num_classes),
            )
            prepared, _, grid = preprocess_volume(volume, preprocess_params(bundle))
            probs = slice_probabilities(network, prepared, self.device, self.batch_size, self.tta)
            native = unorient(probabilities_to_native(probs, grid), affine, rule)
            total = native if total is None else total + native
        assert total is not None
        if len(self.networks) > 1:
            total /= len(self.networks)
        values = np.asarray(self.bundle.label_values, dtype=label_dtype(self.bundle.label_values))
        labels = values[total.argmax(-1)].reshape(shape)
        probabilities = None
        if return_probabilities:
            probabilities = np.moveaxis(total, -1, 0).reshape(total.shape[-1], *shape)
        return Prediction(labels, probabilities)

    def predict_scan(
        self, files: ScanFiles, return_probabilities: bool = False
    ) -> tuple[Scan, Prediction]:
        """Read and segment one case given by its files (see :mod:`contraseg.inference.io`)."""
        scan = read_scan(files)
        prediction = self._predict(
            scan.image, scan.affine, scan.spacing, return_probabilities, scan.source
        )
        prediction.labels = prediction.labels.reshape(scan.shape)
        if prediction.probabilities is not None:
            prediction.probabilities = prediction.probabilities.reshape(-1, *scan.shape)
        return scan, prediction

    def predict_file(
        self,
        in_path: str | Path | Sequence[str | Path],
        out_path: str | Path,
        probabilities_path: str | Path | None = None,
    ) -> Path:
        """Segment a NIfTI file (or the channel files of one case) into ``out_path``, and its
        probabilities into ``probabilities_path`` (``.npz``) when given."""
        paths = [in_path] if isinstance(in_path, str | Path) else list(in_path)
        files = ScanFiles(Path(out_path).name, tuple(Path(p) for p in paths))
        scan, prediction = self.predict_scan(files, probabilities_path is not None)
        write_label_map(Path(out_path), prediction.labels, scan.header)
        if probabilities_path is not None:
            assert prediction.probabilities is not None
            save_probabilities(Path(probabilities_path), prediction.probabilities, scan, self)
        return Path(out_path)


def save_probabilities(path: Path, probabilities: np.ndarray, scan: Scan, seg: Segmenter) -> None:
    """float16 class probabilities (K, *the scan's shape) with the grid and class names, as a
    ``.npz`` readable with ``np.load(path)`` (no pickle), as nnU-Net's ``--save_probabilities``."""
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(
            handle,
            probabilities=probabilities.astype(np.float16),
            affine=scan.affine,
            spacing=np.asarray(scan.spacing),
            class_names=np.asarray(seg.bundle.class_names),
            label_values=np.asarray(seg.bundle.label_values),
        )
