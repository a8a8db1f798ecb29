"""Shared fixtures of the data-layer tests: a small phantom and hand-made ACDC-layout cases."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

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


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def smooth_label(shape: tuple[int, int, int]) -> np.ndarray:
    """Concentric ellipses (LV in Myo, RV beside) shrinking along z: values 0..3."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    label = np.zeros(shape, np.int16)
    cx, cy = shape[0] / 2, shape[1] / 2
    for z in range(shape[2]):
        r = 0.3 * min(shape[:2]) * (1 - 0.5 * z / shape[2])
        d = ((x - cx) / 1.1) ** 2 + (y - cy) ** 2
        label[..., z][((x - cx + 1.3 * r) ** 2 + (y - cy) ** 2) < (0.7 * r) ** 2] = 1
        label[..., z][d < r**2] = 2
        label[..., z][d < (0.65 * r) ** 2] = 3
    return label


AcdcCase = Callable[..., Path]


@pytest.fixture
def helpers() -> SimpleNamespace:
    """Helper functions for test modules (conftest is not importable in importlib mode)."""
    return SimpleNamespace(save_nifti=save_nifti, smooth_label=smooth_label)


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
