"""Finding cases, reading scans and writing label maps that keep the input's header."""

from __future__ import annotations

import bundle_kit
import nibabel as nib
import numpy as np
import pytest

from contraseg.errors import InputError
from contraseg.inference.io import ScanFiles, find_scans, read_scan, write_label_map

# header fields a label map may differ in from its input: type, scaling, display range, and
# for an input with a channel axis, the number of dimensions
CHANGED = {"datatype", "bitpix", "scl_slope", "scl_inter", "cal_min", "cal_max", "dim"}


def _header_diff(a: nib.Nifti1Header, b: nib.Nifti1Header) -> set[str]:
    """Fields that differ (bytes compared, so NaN equals NaN)."""
    return {k for k in a if np.asarray(a[k]).tobytes() != np.asarray(b[k]).tobytes()}


def _names(scans):
    return [(s.name, [p.name for p in s.paths], s.problem) for s in scans]


def test_a_folder_of_files_and_an_nnunet_folder(tmp_path):
    affine = np.eye(4)
    for name in ("b.nii", "a.nii.gz", "img_0001.nii.gz", "img_0002.nii.gz"):
        bundle_kit.save(tmp_path / "plain" / name, np.zeros((4, 4, 2), np.float32), affine)
    (tmp_path / "plain" / "notes.txt").write_text("ignored")
    (tmp_path / "plain" / ".hidden.nii.gz").write_text("ignored")
    assert _names(find_scans(tmp_path / "plain")) == [
        ("a", ["a.nii.gz"], None),
        ("b", ["b.nii"], None),
        ("img_0001", ["img_0001.nii.gz"], None),
        ("img_0002", ["img_0002.nii.gz"], None),
    ]
    for name in ("x_0001.nii.gz", "x_0000.nii.gz", "y_0000.nii.gz", "z_0000.nii.gz"):
        bundle_kit.save(tmp_path / "ts" / name, np.zeros((4, 4, 2), np.float32), affine)
    bundle_kit.save(tmp_path / "ts" / "z_0002.nii.gz", np.zeros((4, 4, 2), np.float32), affine)
    scans = find_scans(tmp_path / "ts")
    assert _names(scans)[:2] == [
        ("x", ["x_0000.nii.gz", "x_0001.nii.gz"], None),
        ("y", ["y_0000.nii.gz"], None),
    ]
    assert scans[2].name == "z" and "z_0001 is missing" in scans[2].problem
    with pytest.raises(InputError, match="z_0001 is missing"):
        read_scan(scans[2])
    assert [s.ending for s in find_scans(tmp_path / "plain")[:2]] == [".nii.gz", ".nii"]
    assert _names(find_scans(tmp_path / "ts" / "y_0000.nii.gz")) == [("y", ["y_0000.nii.gz"], None)]


def test_layout_errors(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        find_scans(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"holds no \.nii"):
        find_scans(tmp_path / "empty")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="not a NIfTI file"):
        find_scans(tmp_path / "scan.png")
    for name in ("a.nii", "a.nii.gz"):
        bundle_kit.save(tmp_path / "twice" / name, np.zeros((4, 4, 2), np.float32), np.eye(4))
    with pytest.raises(InputError, match="names the same case 'a'"):
        find_scans(tmp_path / "twice")


def test_channel_files_must_share_a_grid(tmp_path):
    affine = bundle_kit.oblique_affine((1.0, 1.0, 3.0))
    bundle_kit.save(tmp_path / "c_0000.nii.gz", np.ones((6, 5, 3), np.float32), affine)
    shifted = affine.copy()
    shifted[0, 3] += 2.0
    bundle_kit.save(tmp_path / "c_0001.nii.gz", np.ones((6, 5, 3), np.float32), shifted)
    bundle_kit.save(tmp_path / "c_0002.nii.gz", np.ones((6, 5, 4), np.float32), affine)
    first = tmp_path / "c_0000.nii.gz"
    files = ScanFiles("c", (first, tmp_path / "c_0001.nii.gz"))
    with pytest.raises(
        InputError, match=r"c_0001.nii.gz: affine differs from that of .*c_0000.nii.gz"
    ):
        read_scan(files)
    files = ScanFiles("c", (first, tmp_path / "c_0002.nii.gz"))
    with pytest.raises(InputError, match=r"c_0002.nii.gz: shape \(6, 5, 4\) differs"):
        read_scan(files)


def test_scans_of_every_dimensionality(tmp_path):
    affine = bundle_kit.oblique_affine((0.8, 0.9, 2.5))
    cases = {
        "two_d": (np.ones((7, 5), np.float32), (7, 5), (7, 5, 1, 1)),
        "three_d": (np.ones((7, 5, 3), np.float32), (7, 5, 3), (7, 5, 3, 1)),
        "one_channel": (np.ones((7, 5, 3, 1), np.float32), (7, 5, 3), (7, 5, 3, 1)),
        "two_channels": (np.ones((7, 5, 3, 2), np.float32), (7, 5, 3), (7, 5, 3, 2)),
    }
    for name, (data, shape, image_shape) in cases.items():
        path = bundle_kit.save(tmp_path / f"{name}.nii.gz", data, affine)
        scan = read_scan(ScanFiles(name, (path,)))
        assert (scan.shape, scan.image.shape) == (shape, image_shape), name
        np.testing.assert_allclose(scan.affine, nib.load(path).affine)
    assert read_scan(ScanFiles("a", (tmp_path / "two_d.nii.gz",))).spacing[2] == 1.0
    five = bundle_kit.save(tmp_path / "five.nii.gz", np.ones((3, 3, 3, 2, 2), np.float32), affine)
    with pytest.raises(InputError, match="expected a 2-D, 3-D or 4-D image"):
        read_scan(ScanFiles("five", (five,)))
    nan = np.ones((4, 4, 2), np.float32)
    nan[1, 1, 1] = np.nan
    path = bundle_kit.save(tmp_path / "nan.nii.gz", nan, affine)
    with pytest.raises(InputError, match="NaN or infinite"):
        read_scan(ScanFiles("nan", (path,)))


@pytest.mark.parametrize("codes", [(0, 0), (1, 0), (0, 2), (2, 1), (1, 4)])
@pytest.mark.parametrize("nifti2", [False, True])
@pytest.mark.parametrize("shape", [(9, 7, 3), (9, 7), (9, 7, 3, 2)])
def test_label_map_keeps_the_input_header(tmp_path, codes, nifti2, shape):
    affine = bundle_kit.oblique_affine((0.7, 1.3, 4.0))
    ending = ".nii" if nifti2 else ".nii.gz"
    source = bundle_kit.save(
        tmp_path / f"in{ending}", np.ones(shape, np.float32), affine, *codes, nifti2=nifti2
    )
    scan = read_scan(ScanFiles("in", (source,)))
    labels = np.zeros(scan.shape, np.uint16)
    labels[1:3, 2:4] = 850
    target = tmp_path / f"out{ending}"
    write_label_map(target, labels, scan.header)
    before, after = nib.load(source), nib.load(target)
    assert type(after) is type(before)
    assert after.shape == shape[:3]
    assert after.get_data_dtype() == np.uint16
    np.testing.assert_array_equal(np.asarray(after.dataobj), labels)
    assert _header_diff(before.header, after.header) <= CHANGED
    assert (int(after.header["qform_code"]), int(after.header["sform_code"])) == codes
    np.testing.assert_allclose(after.affine, before.affine)
    assert {p.name for p in tmp_path.iterdir()} == {source.name, target.name}


def test_big_endian_input(tmp_path):
    affine = bundle_kit.oblique_affine((1.0, 1.0, 2.0))
    image = nib.Nifti1Image(np.ones((5, 4, 3), ">f4"), affine)
    image.header.set_data_dtype(">f4")
    path = tmp_path / "be.nii"
    nib.save(image, str(path))
    scan = read_scan(ScanFiles("be", (path,)))
    labels = np.full(scan.shape, 300, np.uint16)
    write_label_map(tmp_path / "out.nii", labels, scan.header)
    out = nib.load(tmp_path / "out.nii")
    np.testing.assert_array_equal(np.asarray(out.dataobj), labels)
    np.testing.assert_allclose(out.affine, affine)
