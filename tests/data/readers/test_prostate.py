"""MSD Task05 Prostate: dataset.json-driven listing, channel choice, labels, bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import reader_kit

from contraseg.config import DataConfig
from contraseg.data.readers import get_reader
from contraseg.errors import InputError


def _reader(root, **kwargs):
    return get_reader(DataConfig(dataset="prostate", root=str(root), **kwargs))


def test_reads_t2_by_default_and_adc_on_request(tmp_path):
    root = reader_kit.write_prostate(tmp_path / "Task05_Prostate")
    reader = _reader(root)
    cases = reader.list_cases(root)
    assert [c.case_id for c in cases] == [
        "prostate_00",
        "prostate_01",
        "prostate_02",
        "prostate_04",
    ]
    assert (reader.default_size, reader.default_spacing) == ((192, 192), (0.625, 0.625))
    assert reader.class_names == ("background", "PZ", "TZ") and reader.in_channels == 1

    volume = reader.load(cases[0])
    raw = np.asarray(nib.load(str(cases[0].image)).dataobj, dtype=np.float32)
    assert volume.image.shape == (40, 36, 5, 1) and volume.image.dtype == np.float32
    np.testing.assert_array_equal(volume.image[..., 0], raw[..., 0])
    assert volume.label.dtype == np.int16 and set(np.unique(volume.label)) == {0, 1, 2}
    assert volume.spacing == pytest.approx((0.625, 0.625, 3.6))

    adc = _reader(root, channel=1).load(cases[0])
    np.testing.assert_array_equal(adc.image[..., 0], raw[..., 1])


def test_no_channel_chosen_for_a_4d_image(tmp_path):
    root = reader_kit.write_prostate(tmp_path / "Task05_Prostate", numbers=(0,))
    reader = _reader(root, channel=None)
    with pytest.raises(InputError, match=r"4-D image.*choose a channel") as err:
        reader.load(reader.list_cases(root)[0])
    assert err.value.path.endswith("prostate_00.nii.gz")


def test_channel_out_of_range(tmp_path):
    root = reader_kit.write_prostate(tmp_path / "Task05_Prostate", numbers=(0,))
    with pytest.raises(InputError, match="channel 2") as err:
        _reader(root, channel=2).list_cases(root)
    assert err.value.path.endswith("dataset.json")


def test_label_value_not_declared(tmp_path):
    root = reader_kit.write_prostate(tmp_path / "Task05_Prostate", numbers=(0,))
    path = root / "labelsTr" / "prostate_00.nii.gz"
    reader_kit.set_voxel(path, (0, 0, 0), 3)
    reader = _reader(root)
    with pytest.raises(InputError, match=r"\[3\] are not declared in dataset.json"):
        reader.load(reader.list_cases(root)[0])


def test_listed_file_missing(tmp_path):
    root = reader_kit.write_prostate(tmp_path / "Task05_Prostate")
    (root / "labelsTr" / "prostate_02.nii.gz").unlink()
    with pytest.raises(InputError, match="file not found") as err:
        _reader(root).list_cases(root)
    assert err.value.path.endswith("labelsTr/prostate_02.nii.gz")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"labels": {}, "modality": {"0": "T2"}}), "missing required key 'training'"),
    ],
)
def test_bad_dataset_json(tmp_path, text, problem):
    root = reader_kit.write_prostate(tmp_path / "Task05_Prostate", numbers=(0,))
    (root / "dataset.json").write_text(text)
    with pytest.raises(InputError, match=problem) as err:
        _reader(root).list_cases(root)
    assert err.value.path.endswith("dataset.json")


def test_label_affine_mismatch(tmp_path):
    root = reader_kit.write_prostate(tmp_path / "Task05_Prostate", numbers=(0,))
    path = root / "labelsTr" / "prostate_00.nii.gz"
    img = nib.load(str(path))
    shifted = img.affine.copy()
    shifted[:3, 3] += 2.0  # 2 mm off
    reader_kit.write_nifti(path, np.asarray(img.dataobj), shifted)
    reader = _reader(root)
    with pytest.raises(InputError, match="affine differs") as err:
        reader.load(reader.list_cases(root)[0])
    assert err.value.path.endswith("labelsTr/prostate_00.nii.gz")


def test_prepare_and_sample(tmp_path, capsys):
    root = reader_kit.write_prostate(tmp_path / "Task05_Prostate")
    prepared = reader_kit.prepare_and_sample(capsys, "prostate", root, "data.size=[32,32]")
    assert prepared.params.target_spacing == (0.625, 0.625)
    assert prepared.cases["prostate_00"].image.shape == (5, 1, 32, 32)
    assert prepared.class_names == ("background", "PZ", "TZ")


def test_case_ids_match_the_packaged_split(tmp_path):
    # the 32 MSD Task05 training cases
    numbers = [0, 1, 2, 4, 6, 7, 10, 13, 14, 16, 17, 18, 20, 21, 24, 25, 28, 29, 31, 32, 34, 35]
    numbers += [37, 38, 39, 40, 41, 42, 43, 44, 46, 47]
    root = reader_kit.write_prostate(tmp_path / "Task05_Prostate", numbers=numbers, shape=(4, 4, 2))
    reader_kit.assert_split_ids_exist(_reader(root), root, "prostate")


def _break_json(root):
    (root / "dataset.json").write_text('{"labels": {"0": "background",')
    return "dataset.json: not valid JSON"


def _drop_training_key(root):
    meta = json.loads((root / "dataset.json").read_text())
    del meta["training"]
    (root / "dataset.json").write_text(json.dumps(meta))
    return "dataset.json: missing required key 'training'"


def _undeclared_label(root):
    path = root / "labelsTr" / "prostate_01.nii.gz"
    reader_kit.set_voxel(path, (1, 1, 1), 4)
    return "labelsTr/prostate_01.nii.gz: label values [4] are not declared in dataset.json"


def _shifted_label(root):
    path = root / "labelsTr" / "prostate_01.nii.gz"
    img = nib.load(str(path))
    affine = img.affine.copy()
    affine[2, 3] += 3.6  # one slice off
    reader_kit.write_nifti(path, np.asarray(img.dataobj), affine)
    return "labelsTr/prostate_01.nii.gz: affine differs"


def _missing_image(root):
    (root / "imagesTr" / "prostate_02.nii.gz").unlink()
    return "imagesTr/prostate_02.nii.gz: file not found"


def _truncated_image(root):
    path = root / "imagesTr" / "prostate_02.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "imagesTr/prostate_02.nii.gz: cannot read NIfTI"


@pytest.mark.parametrize(
    "damage",
    [_break_json, _drop_training_key, _undeclared_label, _shifted_label, _missing_image,
     _truncated_image],
)  # fmt: skip
def test_bad_input_via_cli(tmp_path, capsys, damage):
    root = reader_kit.write_prostate(tmp_path / "Task05_Prostate", numbers=(0, 1, 2))
    reader_kit.expect_error(capsys, "prostate", root, damage(root), "data.size=[32,32]")


def test_4d_image_without_a_channel_via_cli(tmp_path, capsys):
    root = reader_kit.write_prostate(tmp_path / "Task05_Prostate", numbers=(0, 1))
    line = reader_kit.expect_error(
        capsys, "prostate", root, "prostate_00.nii.gz", "data.channel=null"
    )
    assert "choose a channel" in line
