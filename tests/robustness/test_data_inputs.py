"""Hostile inputs to the data layer: cache folders, dataset paths, corrupt files, bad headers.

Each hand-made case reproduces one failure of the hardening issue (data loss, writes or reads
outside the dataset or cache, corrupt data accepted, tracebacks, multi-line messages); the
hypothesis tests check the invariants behind them on random inputs (docs/data.md, "What the
data layer promises").
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from contraseg.config import DataConfig
from contraseg.data.cache import MARKER, prepare_dataset
from contraseg.data.readers.cityscapes import CityscapesReader
from contraseg.data.readers.nifti import load_nifti
from contraseg.data.splits import load_split
from contraseg.data.volume import CaseFiles, check_case_id
from contraseg.errors import InputError

FUZZ = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _phantom(root: Path, volumes: int = 2) -> Path:
    """A tiny dataset in ACDC's layout, written by ``contraseg phantom``."""
    from contraseg.data.phantom import write_phantom_dataset

    write_phantom_dataset(root, volumes=volumes, size=16, seed=0)
    return root


def _prepare(run_cli: Callable, root: Path, cache: Path | None, codes=(2,)):
    """``contraseg prepare`` of the phantom at its default size (64 x 64: tiny volumes are
    padded), with no ``key=value`` overrides."""
    where = ["--root", root] + ([] if cache is None else ["--cache", cache])
    return run_cli("prepare", "--dataset", "phantom", *where, codes=codes)


def _arrays(cache: Path) -> dict[str, np.ndarray]:
    """Every cached array by case and kind (``patient001/image``; file names hold the key)."""
    return {f"{p.parent.name}/{p.name.split('-')[0]}": np.load(p) for p in cache.rglob("*.npy")}


# -- 1. data loss --------------------------------------------------------------------------------


def test_dataset_folder_as_cache_is_refused(sandbox, run_cli) -> None:
    root = _phantom(sandbox.root / "D")
    check = sandbox.watch()
    assert "dataset folder" in _prepare(run_cli, root, root).err
    check()


def test_folder_holding_the_dataset_as_cache_is_refused(sandbox, run_cli) -> None:
    root = _phantom(sandbox.root / "D")
    check = sandbox.watch()
    _prepare(run_cli, root, sandbox.root)
    check()


def test_foreign_folder_as_cache_is_refused(sandbox, run_cli) -> None:
    root = _phantom(sandbox.root / "D")
    (sandbox.root / "C" / "proj").mkdir(parents=True)
    check = sandbox.watch()
    assert MARKER in _prepare(run_cli, root, sandbox.root / "C").err
    check()


def test_empty_folder_is_claimed_and_given_back_on_failure(sandbox, run_cli) -> None:
    root = _phantom(sandbox.root / "D")
    cache = sandbox.root / "C"
    cache.mkdir()
    image = root / "patient002" / "patient002_frame01.nii.gz"
    raw = image.read_bytes()
    image.write_bytes(raw[:-9])  # fails while preparing, after patient001 was written
    check = sandbox.watch()
    _prepare(run_cli, root, cache)
    check()  # still an empty folder, no marker left
    image.write_bytes(raw)
    check = sandbox.watch(allowed=[cache])
    _prepare(run_cli, root, cache, codes=(0,))
    check()
    assert (cache / MARKER).is_file() and (cache / "patient002").is_dir()


def test_default_cache_inside_the_dataset_keeps_working(sandbox, run_cli) -> None:
    root = _phantom(sandbox.root / "D")
    check = sandbox.watch(allowed=[root / ".contraseg-cache"])
    for _ in range(2):
        _prepare(run_cli, root, None, codes=(0,))
    check()


def test_linked_case_folder_is_refused_and_its_target_kept(sandbox, run_cli) -> None:
    root = _phantom(sandbox.root / "D")
    cache = sandbox.root / "C"
    _prepare(run_cli, root, cache, codes=(0,))
    target = sandbox.root / "E"
    target.mkdir()
    (target / "image-0000000000000000.npy").write_bytes(b"mine")
    shutil.rmtree(cache / "patient002")
    (cache / "patient002").symlink_to(target, target_is_directory=True)
    check = sandbox.watch(allowed=[cache])
    assert "link" in _prepare(run_cli, root, cache).err
    check()


def test_links_in_the_cache_are_never_followed_when_deleting(sandbox, run_cli) -> None:
    """A recorded case that leaves the dataset, whose folder or files became links: its clean-up
    removes nothing behind them."""
    root = _phantom(sandbox.root / "D", volumes=3)
    cache = sandbox.root / "C"
    _prepare(run_cli, root, cache, codes=(0,))
    outside = sandbox.root / "E"
    shutil.copytree(cache / "patient003", outside)  # same file names as the recorded ones
    shutil.rmtree(cache / "patient003")
    (cache / "patient003").symlink_to(outside, target_is_directory=True)
    recorded = next((cache / "patient002").glob("image-*.npy"))
    recorded.unlink()
    recorded.symlink_to(next(outside.glob("image-*.npy")))
    shutil.rmtree(root / "patient003")
    for path in (root / "patient002").iterdir():  # new keys: the recorded files are stale
        os.utime(path, ns=(0, 10**18))
    check = sandbox.watch(allowed=[cache])
    _prepare(run_cli, root, cache, codes=(0,))
    check()
    assert (cache / "patient003").is_symlink() and recorded.is_symlink()


# -- 2. paths outside the dataset or the cache ---------------------------------------------------


def _prostate(root: Path, image: str, label: str = "labelsTr/a.nii.gz") -> Path:
    data = np.ones((8, 8, 3), np.float32)
    for name in ("imagesTr/a.nii.gz", "labelsTr/a.nii.gz"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data * (name[0] == "i"), np.eye(4)), str(root / name))
    meta = {
        "modality": {"0": "T2"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "training": [{"image": image, "label": label}],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_case_id_dot_dot_is_refused(sandbox, run_cli) -> None:
    root = sandbox.root / "P"
    _prostate(root, "imagesTr/...nii.gz")
    shutil.copy(root / "imagesTr/a.nii.gz", root / "imagesTr/...nii.gz")
    check = sandbox.watch()
    cache = sandbox.root / "c"
    assert (
        "'..'" in run_cli("prepare", "--dataset", "prostate", "--root", root, "--cache", cache).err
    )
    check()


@pytest.mark.parametrize("entry", ["../outside/x.nii.gz", "/etc/passwd", "imagesTr/../../x.nii.gz"])
def test_dataset_json_paths_outside_the_root_are_refused(sandbox, run_cli, entry: str) -> None:
    outside = sandbox.root / "outside" / "x.nii.gz"
    outside.parent.mkdir()
    nib.save(nib.Nifti1Image(np.ones((8, 8, 3), np.float32), np.eye(4)), str(outside))
    root = _prostate(sandbox.root / "P", entry)
    check = sandbox.watch()
    err = run_cli("prepare", "--dataset", "prostate", "--root", root).err
    assert "dataset.json" in err and "outside the dataset" in err
    check()


@given(st.text(alphabet=st.sampled_from("ab./\\\x00\n\t-_é"), max_size=8) | st.text(max_size=300))
@settings(max_examples=200, deadline=None)
def test_accepted_case_ids_stay_inside_the_cache(case_id: str) -> None:
    try:
        CaseFiles(case_id, Path("image.nii.gz"), None)
    except InputError as err:
        assert "\n" not in str(err) and "image.nii.gz" in str(err)
        return
    assert check_case_id(case_id, None) == case_id
    inside = os.path.normpath(os.path.join("/cache", case_id))
    assert os.path.dirname(inside) == "/cache" and os.path.basename(inside) == case_id


def test_split_ids_are_checked_so_messages_stay_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"pretrain": ["a\nb"], "pretrain_val": [], "test": []}))
    with pytest.raises(InputError) as info:
        load_split(path)
    assert "\n" not in str(info.value)


# -- 3. corrupt data -----------------------------------------------------------------------------


@pytest.fixture
def clean(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A one-case dataset and the arrays that its clean files prepare to."""
    root = _phantom(tmp_path / "D", volumes=1)
    prepared = prepare_dataset(_config(root, tmp_path / "clean"), progress=False)
    return root, _arrays(prepared.cache_dir)


def _config(root: Path, cache: Path) -> DataConfig:
    """The phantom's defaults, as ``_prepare`` on the command line."""
    return DataConfig(dataset="phantom", root=str(root), cache=str(cache))


@given(data=st.data())
@FUZZ
def test_bit_flips_in_a_gzip_file_are_caught_or_harmless(clean, run_cli, data) -> None:
    """Every single-bit flip in a .nii.gz either prepares to the clean arrays (a flip in the
    gzip header's time stamp, say) or is refused with exit 2, leaving no cache."""
    root, expected = clean
    path = root / "patient001" / "patient001_frame01.nii.gz"
    raw = path.read_bytes()
    try:
        bit = data.draw(st.integers(0, 8 * len(raw) - 1))
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(flipped))
        cache = root.parent / "flipped"
        result = _prepare(run_cli, root, cache, codes=(0, 2))
        if result.code == 0:
            assert _arrays(cache).keys() == expected.keys()
            for name, array in _arrays(cache).items():
                np.testing.assert_array_equal(array, expected[name])
            shutil.rmtree(cache)
        else:
            assert not cache.exists() and str(path) in result.err
    finally:
        path.write_bytes(raw)


def _cached_image(tmp_path: Path) -> tuple[DataConfig, Path]:
    root = _phantom(tmp_path / "D", volumes=1)
    config = _config(root, tmp_path / "C")
    return config, prepare_dataset(config, progress=False).cases["patient001"].image_path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _wrong_shape(path: Path) -> None:
    np.save(path, np.zeros((2, 1, 64, 64), np.float32))


def _same_size_other_content(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", [_truncate, _wrong_shape, _same_size_other_content])
def test_damaged_cached_arrays_are_prepared_again(tmp_path: Path, damage) -> None:
    config, image = _cached_image(tmp_path)
    clean = np.load(image)
    damage(image)
    again = prepare_dataset(config, progress=False).cases["patient001"]
    assert again.image_path == image
    np.testing.assert_array_equal(again.image, clean)


def test_damage_that_keeps_size_and_time_needs_verify(tmp_path: Path) -> None:
    """The checksum of a reused file is checked when its modification time changed, or for
    every file with ``verify=True`` (docs/data.md): same-size damage with the old time passes
    the cheap checks."""
    config, image = _cached_image(tmp_path)
    clean = np.load(image)
    before = os.stat(image)
    _same_size_other_content(image)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    cheap = prepare_dataset(config, progress=False).cases["patient001"]
    assert not np.array_equal(cheap.image, clean)
    np.testing.assert_array_equal(
        prepare_dataset(config, progress=False, verify=True).cases["patient001"].image, clean
    )


# -- 6. bad headers, 8. one line -----------------------------------------------------------------


def _nifti_bytes(data: np.ndarray, pixdim: tuple[float, float, float] = (1.5, 1.5, 8.0)) -> bytes:
    """An uncompressed single-file NIfTI-1, written by hand so that any pixdim goes through."""
    header = nib.Nifti1Image(data, np.eye(4)).header
    header["pixdim"][1:4] = pixdim
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4 + data.tobytes(order="F")


def _huge(_: Path) -> bytes:
    block = _nifti_bytes(np.zeros((4, 4, 4), np.int16))
    header = nib.Nifti1Header(block[:348], check=False)
    header["dim"] = [3, 30000, 30000, 30000, 1, 1, 1, 1]
    return header.binaryblock + block[348:]


def _rgb(_: Path) -> bytes:
    rgb = np.zeros((16, 16, 10), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return _nifti_bytes(rgb)


def _bad_magic(path: Path) -> bytes:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[345] ^= 0x10  # "n+1" -> "n;1": nibabel raises HeaderDataError
    return bytes(raw)


def _zero_pixdim(path: Path) -> bytes:
    return _nifti_bytes(np.asarray(nib.load(path).dataobj), pixdim=(1.5, 0.0, 8.0))


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_huge, "voxels, more than"),  # was MemoryError
        (_rgb, "voxel type RGB"),  # was numpy's DTypePromotionError
        (_bad_magic, "magic string"),  # was nibabel's HeaderDataError
        (_zero_pixdim, "voxel size (pixdim)"),  # was a warning line, then 1 mm
    ],
)
def test_bad_headers_give_one_line_and_exit_2(sandbox, run_cli, make, problem: str) -> None:
    root = _phantom(sandbox.root / "D", volumes=1)
    path = root / "patient001" / "patient001_frame01.nii.gz"
    path.write_bytes(gzip.compress(make(path)))
    check = sandbox.watch()
    err = _prepare(run_cli, root, None).err
    assert err.startswith(f"contraseg: error: {path}: ") and problem in err
    check()


def test_nibabel_header_fixes_print_nothing(sandbox, run_cli, caplog) -> None:
    """A negative voxel size is fixed by nibabel (absolute value) with a warning that its own
    handler prints on stderr; the data layer sends it to the debug log instead."""
    root = _phantom(sandbox.root / "D", volumes=1)
    path = root / "patient001" / "patient001_frame01.nii.gz"
    negative = _nifti_bytes(np.asarray(nib.load(path).dataobj), pixdim=(-1.5, 1.5, 8.0))
    path.write_bytes(gzip.compress(negative))
    with caplog.at_level(logging.DEBUG, logger="contraseg.data"):
        assert _prepare(run_cli, root, None, codes=(0,)).err == ""
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("pixdim" in r.getMessage() for r in caplog.records if r.name == "contraseg.data")


def test_case_id_with_a_newline_gives_one_line(sandbox, run_cli) -> None:
    """Case ids come from file names, which may hold a newline: the message escapes both."""
    root = _prostate(sandbox.root / "P", "imagesTr/a\nb.nii.gz")
    shutil.copy(root / "imagesTr/a.nii.gz", root / "imagesTr/a\nb.nii.gz")
    check = sandbox.watch()
    assert "case id 'a\\nb'" in run_cli("prepare", "--dataset", "prostate", "--root", root).err
    check()


@given(data=st.data())
@FUZZ
def test_bit_flips_in_a_plain_nifti_header_never_escape(tmp_path_factory, data) -> None:
    """An uncompressed header has no checksum: a flip may pass, but reading it either works or
    raises one-line :class:`InputError`, never another exception."""
    folder = tmp_path_factory.mktemp("flip")
    raw = bytearray(_nifti_bytes(np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)))
    bit = data.draw(st.integers(0, 8 * 348 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    (folder / "x.nii").write_bytes(bytes(raw))
    try:
        load_nifti(folder / "x.nii")
    except InputError as err:
        assert "\n" not in str(err)


def _png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return out.getvalue()


_RGB_PNG = _png(np.random.default_rng(0).integers(0, 255, (8, 12, 3), dtype=np.uint8))


@given(bit=st.integers(0, 8 * len(_RGB_PNG) - 1))
@example(bit=8 * (_RGB_PNG.index(b"IDAT") - 2))  # IDAT's length + 256: PIL's SyntaxError
@FUZZ
def test_bit_flips_in_a_png_never_escape(tmp_path_factory, bit: int) -> None:
    folder = tmp_path_factory.mktemp("png")
    (folder / "label.png").write_bytes(_png(np.full((8, 12), 7, np.uint8)))
    flipped = bytearray(_RGB_PNG)
    flipped[bit // 8] ^= 1 << (bit % 8)
    (folder / "image.png").write_bytes(bytes(flipped))
    reader = CityscapesReader(DataConfig(dataset="cityscapes", root=str(folder)))
    try:
        reader.load(CaseFiles("a", folder / "image.png", folder / "label.png"))
    except InputError as err:
        assert "\n" not in str(err)


def test_unreadable_cache_folder_gives_one_line(sandbox, run_cli) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    root = _phantom(sandbox.root / "D", volumes=1)
    cache = sandbox.root / "C"
    cache.mkdir()
    cache.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        _prepare(run_cli, root, cache)
    finally:
        cache.chmod(stat.S_IRWXU)
