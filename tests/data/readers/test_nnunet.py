"""nnU-Net raw v2: listing, channels, unlabelled imagesTs, derived defaults, bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from contraseg.config import DataConfig
from contraseg.data.readers import get_reader
from contraseg.errors import InputError


def _reader(root, **kwargs):
    return get_reader(DataConfig(dataset="nnunet", root=str(root), **kwargs))


def test_lists_labelled_and_unlabelled_cases(tmp_path, fx):
    root = fx.write_nnunet(tmp_path / "Dataset042_Pelvis")
    reader = _reader(root)
    cases = reader.list_cases(root)
    assert [(c.case_id, c.label is not None) for c in cases] == [
        ("case_000", True),
        ("case_001", True),
        ("case_002", True),
        ("case_003", True),
        ("case_100", False),
        ("case_101", False),
    ]
    assert reader.class_names == ("background", "lesion", "organ")
    assert (reader.in_channels, reader.num_classes) == (2, 3)


def test_channels_are_stacked_in_order(tmp_path, fx):
    root = fx.write_nnunet(tmp_path / "Dataset042_Pelvis")
    reader = _reader(root)
    case = reader.list_cases(root)[1]
    volume = reader.load(case)
    assert volume.image.shape == (40, 44, 6, 2) and volume.image.dtype == np.float32
    for c in range(2):
        raw = nib.load(str(root / "imagesTr" / f"case_001_{c:04d}.nii.gz")).get_fdata()
        np.testing.assert_allclose(volume.image[..., c], raw, rtol=1e-6)
    assert volume.label.dtype == np.int16 and volume.spacing == pytest.approx((0.8, 0.7, 3.0))
    unlabelled = reader.load(reader.list_cases(root)[-1])
    assert unlabelled.label is None and unlabelled.image.shape[-1] == 2


def test_derived_spacing_and_size(tmp_path, fx):
    # median in-plane spacing (0.8, 0.7); extent 40 * 0.8 = 32 mm, 44 * 0.7 = 30.8 mm
    root = fx.write_nnunet(tmp_path / "Dataset042_Pelvis")
    reader = _reader(root)
    assert reader.default_spacing == pytest.approx((0.8, 0.7))
    assert reader.default_size == (64, 64)  # ceil(40 / 32) * 32, ceil(44 / 32) * 32
    # with a finer target spacing from the config the derived size follows it
    assert _reader(root, target_spacing=[0.25, 0.25]).default_size == (128, 128)


def test_single_channel_dataset(tmp_path, fx):
    root = fx.write_nnunet(tmp_path / "Dataset001_CT", channels={"0": "CT"}, test=())
    reader = _reader(root)
    assert reader.in_channels == 1
    assert reader.load(reader.list_cases(root)[0]).image.shape == (40, 44, 6, 1)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: "{", "not valid JSON"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "file_ending"}), "file_ending"),
        (lambda m: json.dumps({**m, "numTraining": 5}), "numTraining is 5"),
        (lambda m: json.dumps({**m, "labels": {"background": 0, "x": 2}}), "consecutive"),
        (lambda m: json.dumps({**m, "labels": {"background": 0, "r": [1, 2]}}), "region"),
        (lambda m: json.dumps({**m, "file_ending": ".png"}), "not supported"),
    ],
)
def test_bad_dataset_json(tmp_path, fx, edit, problem):
    root = fx.write_nnunet(tmp_path / "Dataset042_Pelvis")
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(edit(meta))
    with pytest.raises(InputError, match=problem) as err:
        _reader(root).list_cases(root)
    assert err.value.path.endswith("dataset.json")


def test_missing_and_unexpected_files(tmp_path, fx):
    root = fx.write_nnunet(tmp_path / "Dataset042_Pelvis")
    (root / "imagesTr" / "case_002_0001.nii.gz").unlink()
    with pytest.raises(InputError, match="file not found") as err:
        _reader(root).list_cases(root)
    assert err.value.path.endswith("imagesTr/case_002_0001.nii.gz")

    root = fx.write_nnunet(tmp_path / "Dataset043_Pelvis")
    (root / "imagesTr" / "case_002_0002.nii.gz").write_bytes(b"")  # a third channel
    with pytest.raises(InputError, match="unexpected file") as err:
        _reader(root).list_cases(root)
    assert err.value.path.endswith("imagesTr/case_002_0002.nii.gz")

    root = fx.write_nnunet(tmp_path / "Dataset044_Pelvis")
    (root / "labelsTr" / "case_003.nii.gz").unlink()
    with pytest.raises(InputError, match="file not found") as err:
        _reader(root).list_cases(root)
    assert err.value.path.endswith("labelsTr/case_003.nii.gz")

    root = fx.write_nnunet(tmp_path / "Dataset045_Pelvis")
    (root / "labelsTr" / "case_009.nii.gz").write_bytes(b"")
    (root / "imagesTr" / ".DS_Store").write_bytes(b"")  # hidden files are skipped
    with pytest.raises(InputError, match="unexpected file") as err:
        _reader(root).list_cases(root)
    assert err.value.path.endswith("labelsTr/case_009.nii.gz")


def test_undeclared_label_and_affine_mismatch(tmp_path, fx):
    root = fx.write_nnunet(tmp_path / "Dataset042_Pelvis", test=())
    path = root / "labelsTr" / "case_000.nii.gz"
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    fx.write_nifti(path, data, img.affine)
    reader = _reader(root)
    with pytest.raises(InputError, match=r"\[7\] are not declared in dataset.json") as err:
        reader.load(reader.list_cases(root)[0])
    assert err.value.path == str(path)

    channel = root / "imagesTr" / "case_001_0001.nii.gz"
    img = nib.load(str(channel))
    tilted = img.affine.copy()
    tilted[0, 1] = 0.05  # a shear no header rounding explains
    fx.write_nifti(channel, np.asarray(img.dataobj), tilted)
    with pytest.raises(InputError, match="affine differs") as err:
        reader.load(reader.list_cases(root)[1])
    assert err.value.path == str(channel)


def test_affine_rounding_is_tolerated(tmp_path, fx):
    root = fx.write_nnunet(tmp_path / "Dataset042_Pelvis", test=())
    path = root / "labelsTr" / "case_000.nii.gz"
    img = nib.load(str(path))
    nudged = img.affine.copy()
    nudged[:3, :3] *= 1 + 1e-5
    fx.write_nifti(path, np.asarray(img.dataobj), nudged)
    reader = _reader(root)
    assert reader.load(reader.list_cases(root)[0]).label is not None
