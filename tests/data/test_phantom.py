"""The phantom: ACDC layout, determinism, anatomy that depends on the slice position, and
difficulty knobs that change what they claim (measured on labels and intensities, not Dice)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from contraseg.cli import main
from contraseg.data.phantom import (
    PRESETS,
    Difficulty,
    Phenotype,
    generate_subject,
    write_phantom_dataset,
)
from contraseg.data.sampling import partition_bounds
from contraseg.errors import InputError

PAPER = PRESETS["paper"]
SUBJECTS = 24
SIZE = 80  # 104 mm or more: every heart fits (they stay within 48 mm of the centre)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    write_phantom_dataset(tmp_path / "a", volumes=3, size=32, seed=7)
    write_phantom_dataset(tmp_path / "b", volumes=3, size=32, seed=7)
    write_phantom_dataset(tmp_path / "c", volumes=3, size=32, seed=8)
    write_phantom_dataset(tmp_path / "d", volumes=3, size=32, seed=7, preset="easy")
    a, b, c, d = (_files(tmp_path / n) for n in "abcd")
    assert a == b
    ed = [k for k in a if k.endswith("frame01.nii.gz")]
    assert len(ed) == 3 and all(a[k] != c[k] and a[k] != d[k] for k in ed)


def test_acdc_layout_and_ranges(phantom_master: Path) -> None:
    folders = sorted(p.name for p in phantom_master.iterdir())
    assert folders == [f"patient{i:03d}" for i in range(1, 9)]
    groups = {p.name for p in PAPER.phenotypes}
    for pid in folders:
        info = dict(
            line.split(": ")
            for line in (phantom_master / pid / "Info.cfg").read_text().splitlines()
        )
        assert info["ED"] == "1" and info["Group"] in groups
        es = int(info["ES"])
        for frame in (1, es):
            image = nib.load(phantom_master / pid / f"{pid}_frame{frame:02d}.nii.gz")
            label = nib.load(phantom_master / pid / f"{pid}_frame{frame:02d}_gt.nii.gz")
            assert image.shape == label.shape
            assert image.shape[:2] == (40, 40)
            assert PAPER.slices[0] <= image.shape[2] <= PAPER.slices[1]
            sx, sy, sz = image.header.get_zooms()
            assert 1.3 <= sx == sy <= 1.6 and 5.0 <= sz <= 10.0
            assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2, 3}


@pytest.mark.parametrize("preset", ["paper", "easy"])
def test_every_subject_differs_and_es_cavity_is_smaller(preset: str) -> None:
    spacings, ed_lv, es_lv = set(), [], []
    for subject in range(1, 7):
        spacing, frames, _ = generate_subject(0, subject, 64, preset)
        spacings.add(spacing)
        (ed_image, ed_label), (_, es_label) = (frames[k] for k in sorted(frames))
        assert ed_image.dtype == np.int16 and ed_image.min() >= 0
        assert set(np.unique(ed_label)) == {0, 1, 2, 3}
        ed_lv.append((ed_label == 3).sum())
        es_lv.append((es_label == 3).sum())
    assert len(spacings) == 6
    assert all(es < ed for es, ed in zip(es_lv, ed_lv, strict=True))


def _partition_areas(preset: str) -> np.ndarray:
    """Per volume: heart area of the 4 partitions, then RV area of the first and last."""
    areas = []
    for subject in range(1, 17):
        _, frames, _ = generate_subject(1, subject, SIZE, preset)
        label = frames[1][1]
        bounds = partition_bounds(label.shape[2], 4)
        per_slice = (label > 0).sum(axis=(0, 1))
        rv = (label == 1).sum(axis=(0, 1))
        areas.append(
            [per_slice[bounds[s] : bounds[s + 1]].mean() for s in range(4)]
            + [rv[bounds[0] : bounds[1]].mean(), rv[bounds[3] : bounds[4]].mean()]
        )
    return np.array(areas)


def test_label_area_depends_on_partition_consistently() -> None:
    """G^D's premise: partition s of one volume looks like partition s of another."""
    easy = _partition_areas("easy")
    assert np.all(easy[:, 0] > easy[:, 3])  # every volume: base > apex partition
    assert easy[:, 0].mean() > 1.5 * easy[:, 3].mean()
    assert np.all(np.diff(easy[:, :4].mean(axis=0)) < 0)  # mean area falls from base to apex
    assert np.all(easy[:, 4] > easy[:, 5])  # the RV fades before the apex
    # paper: the first partition may hold atria or a partly cut basal slice (as in ACDC), so
    # only most volumes keep base > apex; from the second partition on the area falls
    paper = _partition_areas("paper")
    assert np.mean(paper[:, 0] > paper[:, 3]) >= 0.75
    assert np.all(np.diff(paper[:, 1:4].mean(axis=0)) < 0)
    assert np.mean(paper[:, 4] > paper[:, 5]) >= 0.75


# --- the difficulty knobs, each measured against the paper preset with that knob turned off


@dataclasses.dataclass(frozen=True)
class _Stats:
    """Label and intensity statistics of one subject's ED frame."""

    centre: float  # heart centroid x (mm from the image centre)
    reach: float  # farthest heart voxel from the image centre (mm)
    orientation: float  # direction LV -> RV centroid at the slice of largest RV (radians)
    cavity: float  # largest LV cavity slice area (mm^2)
    wall: float  # myocardium / (myocardium + cavity) area in that slice
    rv_extent: float  # last RV slice, relative to the first and last myocardium slices
    n_slices: int
    first: float  # first and last labelled slice, relative (0 first slice, 1 last)
    last: float
    contrast: float  # log(median LV blood / median myocardium)
    bias: tuple[float, float]  # log ratios of the median LV blood on either side, in x and y


def _stats(image: np.ndarray, label: np.ndarray, spacing: float) -> _Stats:
    size, n = label.shape[0], label.shape[2]
    coords = (np.arange(size) - (size - 1) / 2.0) * spacing
    x, y = np.meshgrid(coords, coords, indexing="ij")
    heart = (label > 0).any(axis=2)
    labelled = np.flatnonzero((label > 0).any(axis=(0, 1)))
    areas = [(label == c).sum(axis=(0, 1)) for c in range(4)]
    rv_slices, myo_slices = np.flatnonzero(areas[1]), np.flatnonzero(areas[2])
    k = int(np.argmax(areas[1] * (areas[3] > 0)))
    lv, rv = label[..., k] == 3, label[..., k] == 1
    big = int(np.argmax(areas[3]))
    blood = label == 3
    halves = []
    for axis in (x, y):
        mid = axis[blood.any(axis=2)].mean()
        below, above = blood & (axis < mid)[..., None], blood & (axis >= mid)[..., None]
        halves.append(float(np.log(np.median(image[below]) / np.median(image[above]))))
    return _Stats(
        centre=float(x[heart].mean()),
        reach=float(np.hypot(x, y)[heart].max()),
        orientation=float(np.arctan2(y[rv].mean() - y[lv].mean(), x[rv].mean() - x[lv].mean())),
        cavity=float(areas[3][big] * spacing**2),
        wall=float(areas[2][big] / (areas[2][big] + areas[3][big])),
        rv_extent=float((rv_slices[-1] - myo_slices[0]) / (myo_slices[-1] - myo_slices[0])),
        n_slices=n,
        first=float(labelled[0] / (n - 1)),
        last=float(labelled[-1] / (n - 1)),
        contrast=float(np.log(np.median(image[blood]) / np.median(image[label == 2]))),
        bias=(halves[0], halves[1]),
    )


@cache
def _cohort(difficulty: Difficulty) -> tuple[_Stats, ...]:
    out = []
    for subject in range(1, SUBJECTS + 1):
        spacing, frames, _ = generate_subject(5, subject, SIZE, difficulty)
        out.append(_stats(*frames[1], spacing[0]))
    return tuple(out)


def _spread(values: list[float]) -> float:
    return float(np.std(values))


def _circular_spread(angles: list[float]) -> float:
    return float(np.sqrt(-2 * np.log(np.abs(np.mean(np.exp(1j * np.array(angles)))))))


_NORMAL_ONLY = (Phenotype("NOR", (13.0, 13.0), (6.0, 6.0), (0.0, 0.0), (1.0, 1.0), (0.6, 0.6)),)
KNOBS: dict[str, tuple[dict[str, object], Callable[[tuple[_Stats, ...]], float]]] = {
    "heart centre": ({"shift": 0.0}, lambda c: _spread([s.centre for s in c])),
    "orientation": ({"rotation": 0.0}, lambda c: _circular_spread([s.orientation for s in c])),
    "LV size (disease groups)": (
        {"phenotypes": _NORMAL_ONLY},
        lambda c: _spread([s.cavity for s in c]) / float(np.mean([s.cavity for s in c])),
    ),
    "wall (disease groups)": ({"phenotypes": _NORMAL_ONLY}, lambda c: _spread([s.wall for s in c])),
    "RV extent": ({"rv_end": (0.7, 0.7)}, lambda c: _spread([s.rv_extent for s in c])),
    "slice count": ({"slices": (10, 10)}, lambda c: _spread([s.n_slices for s in c])),
    "first labelled slice": (
        {"first_slice": (0.0, 0.0), "valve_tilt": 0.0, "rv_extension": (0.0, 0.0)},
        lambda c: _spread([s.first for s in c]),
    ),
    "last labelled slice": ({"last_slice": (1.0, 1.0)}, lambda c: _spread([s.last for s in c])),
    "contrast": (
        {"gamma": (1.0, 1.0), "myo": (0.2, 0.2), "blood": (0.8, 0.8)},
        lambda c: _spread([s.contrast for s in c]),
    ),
    "bias field": ({"bias": 0.0}, lambda c: _spread([b for s in c for b in s.bias])),
}


@pytest.mark.parametrize("knob", KNOBS)
def test_each_knob_spreads_what_it_claims(knob: str) -> None:
    off, statistic = KNOBS[knob]
    on_value = statistic(_cohort(PAPER))
    off_value = statistic(_cohort(dataclasses.replace(PAPER, **off)))
    assert on_value > 1.4 * off_value and on_value > 0.01, (on_value, off_value)


@pytest.mark.parametrize("knob", KNOBS)
def test_paper_preset_spreads_more_than_easy(knob: str) -> None:
    _, statistic = KNOBS[knob]
    assert statistic(_cohort(PAPER)) > statistic(_cohort(PRESETS["easy"]))


def test_hearts_stay_in_the_reader_window() -> None:
    """The phantom reader sees 54 mm either side of the centre; hearts stay within 49."""
    for difficulty in (PAPER, PRESETS["easy"]):
        assert max(s.reach for s in _cohort(difficulty)) < 49.0


def _mixed_fraction(image: np.ndarray, flat: np.ndarray, label: np.ndarray, k: int) -> float:
    """Share of slice k's heart voxels whose intensity partial volume moved by over 10 %."""
    heart = label[..., k] > 0
    moved = np.abs(image[..., k].astype(float) - flat[..., k])[heart]
    return float(np.mean(moved > 0.1 * np.median(flat[..., k][heart])))


def test_partial_volume_mixes_basal_slices_only_and_never_labels() -> None:
    """A basal slice averages three positions of its slab; its label is the centre one's."""
    mixed = []
    for subject in range(1, 13):
        _, with_pv, _ = generate_subject(2, subject, 64, PAPER)
        _, without, _ = generate_subject(2, subject, 64, dataclasses.replace(PAPER, slab=0.0))
        (image, label), (flat, flat_label) = with_pv[1], without[1]
        np.testing.assert_array_equal(label, flat_label)
        changed = np.flatnonzero((image != flat).any(axis=(0, 1)))
        assert changed.size > 0 and changed.max() < label.shape[2] / 2  # the base only
        labelled = np.flatnonzero((label > 0).any(axis=(0, 1)))
        mixed.append([_mixed_fraction(image, flat, label, k) for k in labelled[[0, 3]]])
    first, fourth = np.array(mixed).T
    assert np.median(first) > 0.1 and np.all(first > fourth)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="volumes"):
        write_phantom_dataset(tmp_path, volumes=0, size=32, seed=0)
    with pytest.raises(InputError, match="size"):
        write_phantom_dataset(tmp_path, volumes=2, size=8, seed=0)
    with pytest.raises(InputError, match="preset"):
        write_phantom_dataset(tmp_path, volumes=2, size=32, seed=0, preset="hard")  # type: ignore[arg-type]


def test_cli_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for preset in ("easy", "paper"):
        out = tmp_path / preset
        args = ["phantom", "--out", str(out), "--volumes", "2", "--size", "32"]
        assert main([*args, "--preset", preset]) == 0
        assert f"wrote 2 {preset} phantom volumes" in capsys.readouterr().out
    assert _files(tmp_path / "easy") != _files(tmp_path / "paper")
    with pytest.raises(SystemExit):
        main(["phantom", "--out", str(tmp_path / "x"), "--preset", "hard"])
