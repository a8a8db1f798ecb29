"""``contraseg predict``: every scan of a file or folder segmented into an output folder."""

from __future__ import annotations

import os
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
    """Segment every case of ``source`` into ``out_dir/{case}.nii.gz`` (``.nii`` for a ``.nii``
    input) and, with ``save_probs``, ``out_dir/{case}.npz``.

    A bad input is recorded and the others are still predicted; a case whose outputs all exist
    is kept unless ``overwrite``; an output that would replace one of the inputs is refused
    before anything runs. Each output is written atomically, so an interruption leaves only
    whole files.
    """
    report = PredictReport()
    scans = find_scans(Path(source))
    inputs = {os.path.realpath(path) for files in scans for path in files.paths}
    plan = []
    for files in scans:
        outputs = [out_dir / f"{files.name}{files.ending}"]
        if save_probs:
            outputs.append(out_dir / f"{files.name}.npz")
        for output in outputs:
            if os.path.realpath(output) in inputs:
                raise InputError(output, "would overwrite an input scan: choose another --output")
        plan.append((files, outputs))
    for files, outputs in tqdm(plan, desc="predict", unit="vol", disable=None):
        if not overwrite and all(output.exists() for output in outputs):
            report.skipped.append(outputs[0])
            continue
        try:
            scan, prediction = segmenter.predict_scan(files, return_probabilities=save_probs)
        except InputError as err:
            report.failed.append(err)
            continue
        write_label_map(outputs[0], prediction.labels, scan.header)
        if save_probs:
            assert prediction.probabilities is not None
            save_probabilities(outputs[1], prediction.probabilities, scan, segmenter)
        report.written.append(outputs[0])
    return report
