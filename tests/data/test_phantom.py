"""The phantom: ACDC layout, determinism, and anatomy that depends on the slice position."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from contraseg.data.phantom import generate_subject, write_phantom_dataset
from contraseg.data.sampling import partition_bounds
from contraseg.errors import InputError


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    write_phantom_dataset(tmp_path / "a", volumes=3, size=32, seed=7)
    write_phantom_dataset(tmp_path / "b", volumes=3, size=32, seed=7)
    write_phantom_dataset(tmp_path / "c", volumes=3, size=32, seed=8)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b
    ed = [k for k in a if k.endswith("frame01.nii.gz")]
    assert len(ed) == 3 and all(a[k] != c[k] for k in ed)


def test_acdc_layout_and_ranges(phantom_master: Path) -> None:
    folders = sorted(p.name for p in phantom_master.iterdir())
    assert folders == [f"patient{i:03d}" for i in range(1, 9)]
    for pid in folders:
        info = dict(
            line.split(": ")
            for line in (phantom_master / pid / "Info.cfg").read_text().splitlines()
        )
        assert info["ED"] == "1"
        es = int(info["ES"])
        for frame in (1, es):
            image = nib.load(phantom_master / pid / f"{pid}_frame{frame:02d}.nii.gz")
            label = nib.load(phantom_master / pid / f"{pid}_frame{frame:02d}_gt.nii.gz")
            assert image.shape == label.shape
            assert image.shape[:2] == (40, 40) and 8 <= image.shape[2] <= 12
            sx, sy, sz = image.header.get_zooms()
            assert 1.3 <= sx == sy <= 1.6 and 5.0 <= sz <= 10.0
            assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2, 3}


def test_every_subject_differs_and_es_cavity_is_smaller() -> None:
    spacings, ed_lv, es_lv = set(), [], []
    for subject in range(1, 7):
        spacing, frames = generate_subject(0, subject, 48)
        spacings.add(spacing)
        (ed_image, ed_label), (_, es_label) = (frames[k] for k in sorted(frames))
        assert ed_image.dtype == np.int16 and ed_image.min() >= 0
        assert set(np.unique(ed_label)) == {0, 1, 2, 3}
        ed_lv.append((ed_label == 3).sum())
        es_lv.append((es_label == 3).sum())
    assert len(spacings) == 6
    assert all(es < ed for es, ed in zip(es_lv, ed_lv, strict=True))


def test_label_area_depends_on_partition_consistently() -> None:
    """G^D's premise: base partitions hold more heart than apex partitions, in every volume."""
    areas = []
    for subject in range(1, 13):
        _, frames = generate_subject(1, subject, 64)
        label = frames[1][1]
        bounds = partition_bounds(label.shape[2], 4)
        per_slice = (label > 0).sum(axis=(0, 1))
        rv = (label == 1).sum(axis=(0, 1))
        areas.append(
            [per_slice[bounds[s] : bounds[s + 1]].mean() for s in range(4)]
            + [rv[bounds[0] : bounds[1]].mean(), rv[bounds[3] : bounds[4]].mean()]
        )
    areas = np.array(areas)
    assert np.all(areas[:, 0] > areas[:, 3])  # every volume: base > apex partition
    assert areas[:, 0].mean() > 1.5 * areas[:, 3].mean()
    assert np.all(np.diff(areas[:, :4].mean(axis=0)) < 0)  # mean area falls from base to apex
    assert np.all(areas[:, 4] > areas[:, 5])  # the RV fades before the apex


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="volumes"):
        write_phantom_dataset(tmp_path, volumes=0, size=32, seed=0)
    with pytest.raises(InputError, match="size"):
        write_phantom_dataset(tmp_path, volumes=2, size=8, seed=0)
