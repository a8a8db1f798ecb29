"""examples/segment_volume.py runs end to end on the phantom (few iterations here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "segment_volume.py"


@pytest.mark.slow
def test_the_example_segments_a_phantom_volume(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("segment_volume", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path), "--iterations", "2", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "Dice against the reference: RV" in printed
    written = nib.load(tmp_path / "segmentation.nii.gz")
    (line,) = [line for line in printed.splitlines() if line.startswith("segmented ")]
    scan = Path(line.removeprefix("segmented ").split(": labels")[0])
    assert tmp_path / "phantom" in scan.parents
    assert written.shape == nib.load(scan).shape
    assert written.get_data_dtype() == np.uint8
