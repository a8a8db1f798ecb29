"""Benchmark: one whole ``predict`` call against the network's forward pass on the same slices.

An ACDC-sized volume (10 slices of 224 x 256 at 1.5 x 1.5 x 10 mm, an oblique affine, stored
as ``.nii.gz``) is segmented by a model with ACDC's bundle (the paper's UNet, 192 x 192 at
1.367 mm, random weights: the time does not depend on them). The whole call,
``Segmenter.predict_file`` (read, normalise, resample, network, inverse resampling, argmax,
write), is timed against ``network(slices)`` alone on the preprocessed slices, in one process;
the target is a ratio of at most 1.25 (docs/inference.md). With ``--profile`` the whole call is
also broken down by step with cProfile.

Run: ``.venv/bin/python bench/bench_predict.py`` (``--device cuda`` on a GPU; ``--write``
updates BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import pstats
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from benchmarks_md import BENCHMARKS, interleaved_medians, machine, write_section
from safetensors.torch import save_file

from contraseg.data.preprocess import preprocess_volume
from contraseg.data.volume import Volume
from contraseg.inference import Architecture, ModelBundle, Preprocessing, Provenance, Segmenter
from contraseg.inference.bundle import WEIGHTS
from contraseg.inference.io import ScanFiles, read_scan
from contraseg.inference.predictor import preprocess_params
from contraseg.models.unet import DEFAULT_WIDTHS

COLUMNS = [
    "volume", "model input", "whole call ms", "network ms", "whole / network", "volumes/s",
    "machine", "torch", "date",
]  # fmt: skip
SHAPE = (224, 256, 10)
SPACING = (1.5, 1.5, 10.0)


def acdc_bundle(folder: Path) -> Path:
    bundle = ModelBundle(
        architecture=Architecture(DEFAULT_WIDTHS, 1, 4),
        class_names=("background", "RV", "Myo", "LV"),
        label_values=(0, 1, 2, 3),
        preprocessing=Preprocessing(
            target_spacing=(1.36719, 1.36719),
            size=(192, 192),
            percentiles=(1.0, 99.0),
            n4=False,
            channel=None,
            orientation="as_stored",
        ),
        provenance=Provenance("acdc", "custom", (), (), "random", "", 0, None, None, "bench", ""),
    )
    network = bundle.build_network()
    bundle.write(folder)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(folder / WEIGHTS))
    return folder


def acdc_volume(path: Path) -> Path:
    """A heart-like bright disc on noise, with an oblique affine as scanners write them."""
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    disc = ((x - 110) ** 2 + (y - 130) ** 2 < 40**2)[..., None]
    image = (200.0 * disc + rng.normal(100, 20, SHAPE)).astype(np.float32)
    t = np.deg2rad(20.0)
    affine = np.eye(4)
    affine[:3, :3] = (
        np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        @ np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
        @ np.diag(SPACING)
    )
    affine[:3, 3] = (-120.0, 80.0, 35.0)
    nib.save(nib.Nifti1Image(np.rint(image).astype(np.int16), affine), str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile breakdown")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = acdc_bundle(folder / "model")
        source = acdc_volume(folder / "case.nii.gz")
        segmenter = Segmenter.from_pretrained(model, device=device)
        network, bundle = segmenter.networks[0], segmenter.bundle
        scan = read_scan(ScanFiles("case", (source,)))
        volume = Volume("case", scan.image, None, scan.spacing, scan.affine, source)  # as_stored
        slices, _, _ = preprocess_volume(volume, preprocess_params(bundle))
        batch = torch.from_numpy(slices).to(device)

        def forward() -> None:
            with torch.no_grad():
                network(batch)

        def whole() -> None:
            segmenter.predict_file(source, folder / "out" / "case.nii.gz")

        network_ms, whole_ms = interleaved_medians([forward, whole], device, args.repeats)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(whole)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    ratio = whole_ms / network_ms
    row = [
        f"{SHAPE[0]} x {SHAPE[1]} x {SHAPE[2]} at {SPACING[0]} mm, oblique, .nii.gz",
        f"{len(slices)} x 192 x 192",
        f"{whole_ms:.0f}",
        f"{network_ms:.0f}",
        f"{ratio:.3f}",
        f"{1e3 / whole_ms:.2f}",
        machine(device),
        torch.__version__,
        datetime.date.today().isoformat(),
    ]
    print(" | ".join(row))
    if args.write:
        write_section(
            "bench_predict",
            "Prediction (`bench/bench_predict.py`)",
            "One whole `Segmenter.predict_file` call (read, preprocess, network, inverse "
            "resampling, write) vs the network's forward pass alone on the same preprocessed "
            "slices, same process (target: whole / network <= 1.25).",
            COLUMNS,
            [row],
        )
        print(f"wrote {BENCHMARKS}")


if __name__ == "__main__":
    main()
