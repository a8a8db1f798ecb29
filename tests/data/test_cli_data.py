"""``contraseg phantom`` and ``contraseg prepare``: success, and bad input as exit status 2.

Every bad input gives one line on stderr that names the file, no traceback, and no cache.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from contraseg.cli import main


def _prepare(root: Path) -> int:
    return main(["prepare", "--dataset", "phantom", "--root", str(root), "data.size=[32,32]"])


def test_phantom_then_prepare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ph"
    assert main(["phantom", "--out", str(out), "--volumes", "3", "--size", "32"]) == 0
    assert len(list(out.glob("patient*/*_frame01.nii.gz"))) == 3
    assert _prepare(out) == 0
    printed = capsys.readouterr().out
    assert "cases: 3 (3 labelled)" in printed and "background" in printed
    assert (out / ".contraseg-cache" / "manifest.json").is_file()


def _save(path: Path, data: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _label(root: Path, pid: str = "patient002") -> Path:
    return root / pid / f"{pid}_frame01_gt.nii.gz"


def _image(root: Path, pid: str = "patient002") -> Path:
    return root / pid / f"{pid}_frame01.nii.gz"


def _shape(root: Path) -> tuple[int, ...]:
    return nib.load(_image(root)).shape


def _remove_label(root: Path) -> Path:
    _label(root).unlink()
    return _label(root)


def _shape_mismatch(root: Path) -> Path:
    x, y, z = _shape(root)
    _save(_label(root), np.zeros((x, y, z - 1), np.uint8))
    return _label(root)


def _not_3d(root: Path) -> Path:
    x, y, z = _shape(root)
    _save(_image(root), np.zeros((x, y, z, 2), np.float32))
    return _image(root)


def _nan(root: Path) -> Path:
    data = np.asarray(nib.load(_image(root)).dataobj, np.float32)
    data[3, 3, 1] = np.nan
    _save(_image(root), data)
    return _image(root)


def _bad_label_value(root: Path) -> Path:
    data = np.asarray(nib.load(_label(root)).dataobj).copy()
    data[0, 0, 0] = 7
    _save(_label(root), data)
    return _label(root)


def _truncated(root: Path) -> Path:
    raw = _image(root).read_bytes()
    _image(root).write_bytes(raw[: len(raw) // 3])
    return _image(root)


def _missing_info(root: Path) -> Path:
    (root / "patient002" / "Info.cfg").unlink()
    return root / "patient002" / "Info.cfg"


def _missing_folder(root: Path) -> Path:
    return root / "does-not-exist"


@pytest.mark.parametrize(
    "damage",
    [
        _missing_folder,
        _remove_label,
        _shape_mismatch,
        _not_3d,
        _nan,
        _bad_label_value,
        _truncated,
        _missing_info,
    ],
)
def test_bad_input_exit_2_one_line_no_cache(
    phantom_root: Path, capsys: pytest.CaptureFixture[str], damage: Callable[[Path], Path]
) -> None:
    bad = damage(phantom_root)
    root = bad if damage is _missing_folder else phantom_root
    assert _prepare(root) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"contraseg: error: {bad}: ")
    assert not (phantom_root / ".contraseg-cache").exists()


def test_debug_shows_the_exception(phantom_root: Path) -> None:
    _remove_label(phantom_root)
    with pytest.raises(Exception, match="label file"):
        main(["--debug", "prepare", "--dataset", "phantom", "--root", str(phantom_root)])


def test_bad_phantom_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["phantom", "--out", str(tmp_path), "--volumes", "0"]) == 2
    assert "--volumes" in capsys.readouterr().err
