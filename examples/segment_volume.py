"""Segment a scan with a trained model through the Python API, end to end on the phantom.

Without ``--model`` the script writes a small phantom dataset (``contraseg phantom``), fine-tunes
a UNet from random weights on 8 of its labelled volumes (a few minutes on a 2-core CPU), then
segments one of the phantom's test volumes, which training never saw, and scores the result
against its reference. With ``--model`` and ``--scan`` it segments your scan with your model.

    python examples/segment_volume.py --out example_out
    python examples/segment_volume.py --model runs/acdc/ft-1vol-c1 --scan scan.nii.gz --out out

The five lines that matter are in :func:`segment`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from contraseg import Segmenter
from contraseg.config import FinetuneRun, load_config
from contraseg.data.dataset import load_dataset
from contraseg.data.phantom import write_phantom_dataset
from contraseg.data.readers import get_reader
from contraseg.evaluation.metrics import dice_per_class
from contraseg.training.stages import run_finetune


def segment(model: Path, scan: Path, out: Path, device: str) -> np.ndarray:
    """The Python API: load a bundle, segment an array, segment a file."""
    segmenter = Segmenter.from_pretrained(model, device=device)
    image = nib.load(scan)
    prediction = segmenter.predict(image.get_fdata(), image.affine)  # labels on the scan's grid
    segmenter.predict_file(scan, out / "segmentation.nii.gz")  # the same, written as NIfTI
    return prediction.labels


def train_on_the_phantom(out: Path, iterations: int, device: str) -> tuple[Path, Path, Path]:
    """A fine-tuned model and one test volume of the phantom with its reference."""
    write_phantom_dataset(out / "phantom", volumes=24, size=64, seed=0)
    config = load_config(
        FinetuneRun,
        None,
        [
            "data.dataset=phantom",
            f"data.root={out / 'phantom'}",
            "finetune.labelled_volumes=8",
            f"finetune.val_every={max(1, iterations // 4)}",
            f"optim.iterations={iterations}",
            "optim.batch_size=8",
        ],
    )
    model = run_finetune(config, out / "model", device=device)
    _, split = load_dataset(config.data)
    files = {c.case_id: c for c in get_reader(config.data).list_cases(config.data.root)}
    test = files[split.test[0]]
    assert test.label is not None
    return model, test.image, test.label


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("example_out"), help="output folder")
    parser.add_argument("--model", type=Path, help="a model bundle (finished finetune run)")
    parser.add_argument("--scan", type=Path, help="the .nii/.nii.gz scan to segment")
    parser.add_argument("--iterations", type=int, default=100, help="fine-tuning iterations")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    args = parser.parse_args(argv)
    if (args.model is None) != (args.scan is None):
        parser.error("give both --model and --scan, or neither (to run on the phantom)")
    reference = None
    model, scan = args.model, args.scan
    if model is None:
        model, scan, reference = train_on_the_phantom(args.out, args.iterations, args.device)
    labels = segment(model, scan, args.out, args.device)
    print(f"segmented {scan}: labels {np.unique(labels).tolist()}, shape {labels.shape}")
    print(f"wrote {args.out / 'segmentation.nii.gz'}")
    if reference is not None:
        truth = np.rint(nib.load(reference).get_fdata()).astype(np.int64)
        dice = dice_per_class(labels.astype(np.int64), truth, num_classes=4)
        print(f"Dice against the reference: RV {dice[0]:.3f}, Myo {dice[1]:.3f}, LV {dice[2]:.3f}")


if __name__ == "__main__":
    main()
