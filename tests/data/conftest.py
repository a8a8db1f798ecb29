"""Shared fixtures of the data-layer tests: a small phantom and hand-made ACDC-layout cases."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from volume_kit import save_nifti, smooth_label

from contraseg.data.phantom import write_phantom_dataset

PHANTOM_VOLUMES = 8
PHANTOM_SIZE = 40


@pytest.fixture(scope="session")
def phantom_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom_master")
    write_phantom_dataset(root, volumes=PHANTOM_VOLUMES, size=PHANTOM_SIZE, seed=3)
    return root


@pytest.fixture
def phantom_root(phantom_master: Path, tmp_path: Path) -> Path:
    """A private copy of the small phantom that a test may modify."""
    root = tmp_path / "phantom"
    shutil.copytree(phantom_master, root)
    return root


AcdcCase = Callable[..., Path]


@pytest.fixture
def acdc_case(tmp_path: Path) -> AcdcCase:
    """Factory writing ``root/patientXXX`` in ACDC's layout; returns the patient folder."""

    def make(
        pid: str = "patient001",
        ed: int = 4,
        es: int = 9,
        shape: tuple[int, int, int] = (30, 34, 6),
        affine: np.ndarray | None = None,
        label_dtype: type = np.float32,
        root: Path | None = None,
    ) -> Path:
        folder = (root or tmp_path / "acdc") / pid
        rng = np.random.default_rng(0)
        for frame in (ed, es):
            label = smooth_label(shape)
            image = (100 * label + rng.normal(50, 5, shape)).astype(np.int16)
            save_nifti(folder / f"{pid}_frame{frame:02d}.nii.gz", image, affine)
            save_nifti(
                folder / f"{pid}_frame{frame:02d}_gt.nii.gz", label.astype(label_dtype), affine
            )
        (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nNbFrame: 30\n")
        return folder

    return make
