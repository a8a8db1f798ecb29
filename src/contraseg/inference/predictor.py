"""The :class:`Segmenter`: one trained model (or an ensemble) applied to whole volumes.

It is the only inference path of contraseg: fine-tuning's validation, ``contraseg evaluate``,
``contraseg predict``, the demo and the Python API all go through it, as nnU-Net's trainer
validates with its ``nnUNetPredictor``. It needs no training code: a bundle
(:mod:`contraseg.inference.bundle`) or a live network with its bundle is enough.

Per volume: orient as the model's reader did, preprocess (normalise, resample in-plane, crop or
pad), run the slices through the network in batches, optionally average over flips (TTA), take
the softmax back to the native grid (un-crop, bilinear resize), average over the ensemble there,
then argmax, un-orient and map class indices to the dataset's label values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from contraseg import fileio
from contraseg.data.cache import PreparedCase
from contraseg.data.orientation import orient, unorient
from contraseg.data.preprocess import PreprocessParams, preprocess_volume, probabilities_to_native
from contraseg.data.volume import Volume
from contraseg.errors import InputError
from contraseg.inference.bundle import ModelBundle, load_bundle
from contraseg.inference.device import resolve_device
from contraseg.inference.io import Scan, ScanFiles, label_dtype, read_scan, write_label_map

# flips of the two in-plane axes of a (B, C, H, W) batch averaged by test-time augmentation
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (2, 3))


def preprocess_params(bundle: ModelBundle) -> PreprocessParams:
    pre = bundle.preprocessing
    return PreprocessParams(pre.target_spacing, pre.size, pre.n4, pre.percentiles)


@torch.no_grad()
def slice_probabilities(
    network: nn.Module,
    image: np.ndarray,
    device: torch.device,
    batch_size: int = 32,
    tta: bool = False,
) -> np.ndarray:
    """Softmax maps (Z, K, H, W) float32 of a preprocessed volume (Z, C, H, W), batched.

    The network's train/eval mode is restored afterwards, so validation can call this in the
    middle of training.
    """
    was_training = network.training
    network.eval()
    outputs = []
    use_autocast = device.type == "cuda"
    flips = TTA_FLIPS if tta else ((),)
    for start in range(0, image.shape[0], batch_size):
        chunk = torch.from_numpy(np.array(image[start : start + batch_size], dtype=np.float32))
        chunk = chunk.to(device, non_blocking=True)
        total = None
        for dims in flips:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                logits = network(chunk.flip(dims) if dims else chunk)
            probs = torch.softmax(logits.float(), dim=1)
            probs = probs.flip(dims) if dims else probs
            total = probs if total is None else total + probs
        assert total is not None
        outputs.append((total / len(flips)).cpu().numpy())
    network.train(was_training)
    return np.concatenate(outputs)


@dataclass
class Prediction:
    """Labels on the input grid (label values) and, on request, the class probabilities."""

    labels: np.ndarray  # (X, Y, Z) uint8 or uint16
    probabilities: np.ndarray | None  # (K, X, Y, Z) float32


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
        first = bundles[0]
        for bundle in bundles[1:]:
            if (bundle.class_names, bundle.label_values) != (first.class_names, first.label_values):
                raise InputError(
                    None, "the models of an ensemble must share their classes and label values"
                )
            if bundle.architecture.in_channels != first.architecture.in_channels:
                raise InputError(None, "the models of an ensemble must take the same channels")
        self.device = resolve_device(device)
        self.networks = [network.to(self.device) for network in networks]
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
        """Segment one volume given as (X, Y, Z) or (X, Y, Z, C) with its 4 x 4 affine.

        ``spacing`` defaults to the column norms of the affine. The labels come back on the
        input's grid, as the dataset's label values.
        """
        image = np.asarray(image, dtype=np.float32)
        if image.ndim == 3:
            image = image[..., None]
        if image.ndim != 4 or image.shape[-1] != self.bundle.architecture.in_channels:
            raise InputError(
                None,
                f"expected (X, Y, Z) or (X, Y, Z, {self.bundle.architecture.in_channels}), "
                f"got {image.shape}",
            )
        affine = np.asarray(affine, dtype=np.float64)
        if spacing is None:
            spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
        total = None
        for network, bundle in zip(self.networks, self.bundles, strict=True):
            rule = bundle.preprocessing.orientation
            oriented, oriented_affine, oriented_spacing = orient(image, affine, spacing, rule)
            volume = Volume("input", oriented, None, oriented_spacing, oriented_affine, Path())
            prepared, _, grid = preprocess_volume(volume, preprocess_params(bundle))
            probs = slice_probabilities(network, prepared, self.device, self.batch_size, self.tta)
            native = unorient(probabilities_to_native(probs, grid), affine, rule)
            total = native if total is None else total + native
        assert total is not None
        total /= len(self.networks)
        values = np.asarray(self.bundle.label_values, dtype=label_dtype(self.bundle.label_values))
        labels = values[total.argmax(-1)]
        probabilities = np.moveaxis(total, -1, 0) if return_probabilities else None
        return Prediction(labels, probabilities)

    def predict_scan(
        self, files: ScanFiles, return_probabilities: bool = False
    ) -> tuple[Scan, Prediction]:
        """Read and segment one case given by its files (see :mod:`contraseg.inference.io`)."""
        pre = self.bundle.preprocessing
        scan = read_scan(files, self.bundle.architecture.in_channels, pre.channel)
        return scan, self.predict(scan.image, scan.affine, scan.spacing, return_probabilities)

    def predict_file(
        self,
        in_path: str | Path | Sequence[str | Path],
        out_path: str | Path,
        probabilities_path: str | Path | None = None,
    ) -> Path:
        """Segment a NIfTI file (or the channel files of one case) into ``out_path``."""
        paths = [in_path] if isinstance(in_path, str | Path) else list(in_path)
        files = ScanFiles(Path(out_path).name, tuple(Path(p) for p in paths))
        scan, prediction = self.predict_scan(files, probabilities_path is not None)
        write_label_map(Path(out_path), prediction.labels, scan.header)
        if probabilities_path is not None:
            assert prediction.probabilities is not None
            save_probabilities(Path(probabilities_path), prediction.probabilities, scan, self)
        return Path(out_path)


def save_probabilities(path: Path, probabilities: np.ndarray, scan: Scan, seg: Segmenter) -> None:
    """float16 class probabilities (K, X, Y, Z) with the grid and class names, as a ``.npz``
    readable with ``np.load(path)`` (no pickle), as nnU-Net's ``--save_probabilities``."""
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(
            handle,
            probabilities=probabilities.astype(np.float16),
            affine=scan.affine,
            spacing=np.asarray(scan.spacing),
            class_names=np.asarray(seg.bundle.class_names),
            label_values=np.asarray(seg.bundle.label_values),
        )
