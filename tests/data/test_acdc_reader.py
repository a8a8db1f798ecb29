"""ACDC reader on the phantom and on hand-made ACDC-layout cases, including every bad input."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import volume_kit

from contraseg.config import DataConfig
from contraseg.data.readers import get_reader
from contraseg.data.readers.acdc import AcdcReader, PhantomReader
from contraseg.errors import InputError

AcdcCase = Callable[..., Path]


def _reader(**kwargs) -> AcdcReader:
    return AcdcReader(DataConfig(dataset="acdc", **kwargs))


def test_phantom_through_the_acdc_code(phantom_master: Path) -> None:
    reader = get_reader(DataConfig(dataset="phantom"))
    assert isinstance(reader, PhantomReader) and reader.name == "phantom"
    assert reader.default_size == (64, 64) and reader.num_classes == 4
    cases = reader.list_cases(phantom_master)
    assert [c.case_id for c in cases] == [f"patient{i:03d}" for i in range(1, 9)]
    volume = reader.load(cases[0])
    assert volume.image.dtype == np.float32 and volume.image.shape[:2] == (40, 40)
    assert volume.image.ndim == 4 and volume.image.shape[3] == 1
    assert volume.label is not None and volume.label.dtype == np.int16
    assert volume.label.shape == volume.image.shape[:3]
    header = nib.load(cases[0].image).header
    assert volume.spacing == pytest.approx(header.get_zooms())


def test_hand_made_case_ed_frame_affine_float_labels(acdc_case: AcdcCase) -> None:
    affine = np.array(
        [[0.0, -1.4, 0.0, 10.0], [1.4, 0.0, 0.0, -5.0], [0.0, 0.0, 8.0, 3.0], [0, 0, 0, 1]]
    )
    folder = acdc_case(ed=4, es=9, affine=affine, label_dtype=np.float32)
    reader = _reader()
    assert reader.default_spacing == (1.36719, 1.36719) and reader.default_size == (192, 192)
    (case,) = reader.list_cases(folder.parent)
    assert case.case_id == "patient001"
    assert case.image.name == "patient001_frame04.nii.gz"  # ED named by Info.cfg, not frame01
    volume = reader.load(case)
    np.testing.assert_allclose(volume.affine, affine)
    assert volume.spacing == pytest.approx((1.4, 1.4, 8.0))
    np.testing.assert_array_equal(volume.label, volume_kit.smooth_label((30, 34, 6)))


def test_frames_es_and_both(acdc_case: AcdcCase) -> None:
    folder = acdc_case(ed=4, es=9)
    (es,) = _reader(frames=["ES"]).list_cases(folder.parent)
    assert es.case_id == "patient001" and es.image.name == "patient001_frame09.nii.gz"
    both = _reader(frames=["ED", "ES"]).list_cases(folder.parent)
    assert [c.case_id for c in both] == ["patient001", "patient001_ES"]
    with pytest.raises(InputError, match="frames"):
        _reader(frames=["EX"])


def test_training_and_testing_subfolders(acdc_case: AcdcCase, tmp_path: Path) -> None:
    root = tmp_path / "database"
    acdc_case(pid="patient001", root=root / "training")
    acdc_case(pid="patient101", root=root / "testing")
    assert [c.case_id for c in _reader().list_cases(root)] == ["patient001", "patient101"]


def _raises_on(path: Path, match: str, action) -> None:
    with pytest.raises(InputError, match=match) as info:
        action()
    assert info.value.path == str(path)


def test_missing_folder_and_no_patients(tmp_path: Path) -> None:
    _raises_on(tmp_path / "nope", "not found", lambda: _reader().list_cases(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    _raises_on(tmp_path / "empty", "no patient", lambda: _reader().list_cases(tmp_path / "empty"))


@pytest.mark.parametrize(
    ("text", "match"),
    [(None, "Info.cfg not found"), ("ES: 9\n", "no 'ED:'"), ("ED: four\nES: 9\n", "frame number")],
)
def test_bad_info_cfg(acdc_case: AcdcCase, text: str | None, match: str) -> None:
    folder = acdc_case()
    info = folder / "Info.cfg"
    if text is None:
        info.unlink()
    else:
        info.write_text(text)
    _raises_on(info, match, lambda: _reader().list_cases(folder.parent))


def test_missing_image_or_label(acdc_case: AcdcCase) -> None:
    folder = acdc_case()
    label = folder / "patient001_frame04_gt.nii.gz"
    label.unlink()
    _raises_on(label, "label file", lambda: _reader().list_cases(folder.parent))
    image = folder / "patient001_frame04.nii.gz"
    image.unlink()
    _raises_on(image, "image", lambda: _reader().list_cases(folder.parent))


def _load_with(
    acdc_case: AcdcCase, which: str, data: np.ndarray
) -> tuple[Path, Callable[[], object]]:
    folder = acdc_case()
    path = folder / f"patient001_frame04{'_gt' if which == 'label' else ''}.nii.gz"
    volume_kit.save_nifti(path, data)
    reader = _reader()
    (case,) = reader.list_cases(folder.parent)
    return path, lambda: reader.load(case)


@pytest.mark.parametrize(
    ("which", "data", "match"),
    [
        ("label", np.zeros((30, 34, 5), np.float32), "differs from image shape"),
        ("image", np.zeros((30, 34, 6, 2), np.float32), "3-D"),
        ("image", np.zeros((30, 34), np.float32), "3-D"),
        ("label", np.zeros((30, 34, 6, 3), np.float32), "3-D"),
        ("image", np.full((30, 34, 6), np.nan, np.float32), "NaN or infinite"),
        ("image", np.full((30, 34, 6), np.inf, np.float32), "NaN or infinite"),
        ("label", np.full((30, 34, 6), np.nan, np.float32), "NaN or infinite"),
        ("label", np.full((30, 34, 6), 5, np.float32), r"label values \[5\]"),
        ("label", np.full((30, 34, 6), 1.5, np.float32), "non-integer"),
    ],
)
def test_bad_volumes(acdc_case: AcdcCase, which: str, data: np.ndarray, match: str) -> None:
    path, load = _load_with(acdc_case, which, data)
    _raises_on(path, match, load)


def test_trailing_singleton_axis_is_accepted(acdc_case: AcdcCase) -> None:
    label = volume_kit.smooth_label((30, 34, 6)).astype(np.float32)[..., None]
    _, load = _load_with(acdc_case, "label", label)
    assert load().label.shape == (30, 34, 6)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_file(acdc_case: AcdcCase, damage: str) -> None:
    folder = acdc_case()
    path = folder / "patient001_frame04.nii.gz"
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    else:
        path.write_bytes(gzip.compress(b"not a nifti file at all" * 20))
    reader = _reader()
    (case,) = reader.list_cases(folder.parent)
    _raises_on(path, "NIfTI", lambda: reader.load(case))
