"""MM-WHS MR: label mapping 205..850 -> 1..7, reorientation to RAS+, bad input."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import reader_kit
from nibabel.affines import apply_affine

from contraseg.config import DataConfig
from contraseg.data.readers import get_reader
from contraseg.data.readers.mmwhs import map_labels
from contraseg.errors import InputError


def _reader(root):
    return get_reader(DataConfig(dataset="mmwhs", root=str(root)))


def test_label_mapping_in_ascending_order(tmp_path):
    raw = np.array([0, 205, 420, 500, 550, 600, 820, 850], dtype=np.float32)
    np.testing.assert_array_equal(map_labels(tmp_path / "l.nii.gz", raw), np.arange(8))
    with pytest.raises(InputError, match=r"\[421, 1000\]") as err:
        map_labels(tmp_path / "l.nii.gz", np.array([0, 205, 421, 1000], dtype=np.float32))
    assert err.value.path.endswith("l.nii.gz")


def test_lists_cases_with_file_stem_ids(tmp_path):
    root = reader_kit.write_mmwhs(tmp_path / "mr_train")
    (root / "readme.txt").write_text("other files are ignored")
    reader = _reader(root)
    assert [c.case_id for c in reader.list_cases(root)] == [
        "mr_train_1001",
        "mr_train_1002",
        "mr_train_1003",
    ]
    assert (reader.default_size, reader.default_spacing, reader.num_classes) == (
        (160, 160),
        (1.5, 1.5),
        8,
    )
    # the parent of the official mr_train folder works too
    assert len(reader.list_cases(tmp_path)) == 3


def test_oblique_coronal_volume_becomes_axial_ras(tmp_path):
    root = reader_kit.write_mmwhs(tmp_path / "mr_train", numbers=(1001,))
    case = _reader(root).list_cases(root)[0]
    volume = _reader(root).load(case)
    raw_img = nib.load(str(case.label))
    raw = np.asarray(raw_img.dataobj)

    # coronal (L, I, A) voxel order -> (R, A, S): axes permuted, spacing with them
    assert raw.shape == (30, 24, 20)
    assert volume.image.shape == (30, 20, 24, 1) and volume.label.shape == (30, 20, 24)
    assert volume.spacing == pytest.approx((1.2, 1.8, 1.0))
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert nib.aff2axcodes(raw_img.affine) == ("L", "I", "A")

    # every voxel keeps its world position and its (mapped) label
    mapped = map_labels(case.label, raw)
    for value in range(1, 8):
        old = np.argwhere(mapped == value)
        new = np.argwhere(volume.label == value)
        assert len(old) == len(new) > 0
        old_world = np.sort(apply_affine(raw_img.affine, old), axis=0)
        new_world = np.sort(apply_affine(volume.affine, new), axis=0)
        np.testing.assert_allclose(old_world, new_world, atol=1e-4)
    np.testing.assert_array_equal(volume.label, np.flip(mapped, 0).transpose(0, 2, 1)[:, :, ::-1])


def test_unknown_label_value_is_named(tmp_path):
    root = reader_kit.write_mmwhs(tmp_path / "mr_train", numbers=(1001,))
    path = root / "mr_train_1001_label.nii.gz"
    reader_kit.set_voxel(path, (0, 0, 0), 421)
    reader = _reader(root)
    with pytest.raises(InputError, match=r"label values \[421\]") as err:
        reader.load(reader.list_cases(root)[0])
    assert err.value.path == str(path)


def test_missing_label_and_unexpected_file(tmp_path):
    root = reader_kit.write_mmwhs(tmp_path / "mr_train")
    (root / "mr_train_1002_label.nii.gz").unlink()
    with pytest.raises(InputError, match="file not found") as err:
        _reader(root).list_cases(root)
    assert err.value.path.endswith("mr_train_1002_label.nii.gz")

    (root / "mr_train_1002_image.nii.gz").unlink()
    (root / "mr_train_1004_img.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="unexpected file") as err:
        _reader(root).list_cases(root)
    assert err.value.path.endswith("mr_train_1004_img.nii.gz")


def test_prepare_and_sample(tmp_path, capsys):
    root = reader_kit.write_mmwhs(tmp_path / "mr_train")
    prepared = reader_kit.prepare_and_sample(capsys, "mmwhs", root, "data.size=[32,32]")
    # reoriented (30, 20, 24) at (1.2, 1.8, 1.0) mm -> 24 slices of 24 x 24 at 1.5 mm, padded
    case = prepared.cases["mr_train_1001"]
    assert case.image.shape == (24, 1, 32, 32)
    assert case.grid.native_shape == (30, 20, 24)
    assert set(np.unique(case.label)) == set(range(8))


def test_case_ids_match_the_packaged_split(tmp_path):
    root = reader_kit.write_mmwhs(tmp_path / "mr_train", numbers=range(1001, 1021), shape=(4, 4, 3))
    reader_kit.assert_split_ids_exist(_reader(root), root, "mmwhs")


def _unknown_label(root):
    path = root / "mr_train_1002_label.nii.gz"
    reader_kit.set_voxel(path, (2, 2, 2), 421)
    return "mr_train_1002_label.nii.gz: label values [421]"


def _missing_label(root):
    (root / "mr_train_1003_label.nii.gz").unlink()
    return "mr_train_1003_label.nii.gz: file not found"


def _unexpected_file(root):
    (root / "mr_train_1004_image (1).nii.gz").write_bytes(b"")
    return "mr_train_1004_image (1).nii.gz: unexpected file"


def _label_of_another_grid(root):
    path = root / "mr_train_1002_label.nii.gz"
    img = nib.load(str(path))
    reader_kit.write_nifti(path, np.asarray(img.dataobj), reader_kit.axial_affine((1.2, 1.0, 1.8)))
    return "mr_train_1002_label.nii.gz: affine differs"


def _nan_image(root):
    path = root / "mr_train_1003_image.nii.gz"
    reader_kit.set_voxel(path, (0, 0, 0), np.nan)
    return "mr_train_1003_image.nii.gz: 1 voxels are NaN"


@pytest.mark.parametrize(
    "damage", [_unknown_label, _missing_label, _unexpected_file, _label_of_another_grid, _nan_image]
)
def test_bad_input_via_cli(tmp_path, capsys, damage):
    root = reader_kit.write_mmwhs(tmp_path / "mr_train")
    reader_kit.expect_error(capsys, "mmwhs", root, damage(root), "data.size=[32,32]")
