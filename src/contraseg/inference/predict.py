"""``contraseg predict``: every scan of a file or folder segmented into an output folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from contraseg.errors import InputError
from contraseg.inference.io import find_scans, write_label_map
from contraseg.inference.predictor import Segmenter, save_probabilities


@dataclass
class PredictReport:
    """What a folder prediction did, case by case."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # outputs that existed (no --overwrite)
    failed: list[InputError] = field(default_factory=list)  # one per unreadable input


def predict_to_folder(
    segmenter: Segmenter,
    source: Path,
    out_dir: Path,
    overwrite: bool = False,
    save_probs: bool = False,
) -> PredictReport:
    """Segment every case of ``source`` into ``out_dir/{case}.nii.gz`` (and ``{case}.npz``).

    A bad input is recorded and the others are still predicted; an existing output is kept
    unless ``overwrite``. Each output is written atomically, so an interruption leaves only
    whole files.
    """
    report = PredictReport()
    scans = find_scans(source)
    for files in tqdm(scans, desc="predict", unit="vol", disable=None):
        target = out_dir / f"{files.name}.nii.gz"
        if target.exists() and not overwrite:
            report.skipped.append(target)
            continue
        try:
            scan, prediction = segmenter.predict_scan(files, return_probabilities=save_probs)
        except InputError as err:
            report.failed.append(err)
            continue
        write_label_map(target, prediction.labels, scan.header)
        if save_probs:
            assert prediction.probabilities is not None
            save_probabilities(
                out_dir / f"{files.name}.npz", prediction.probabilities, scan, segmenter
            )
        report.written.append(target)
    return report
