"""The .npy cache: contents, reuse, invalidation, and no partial cache after a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from child_process import child_env

from contraseg.config import DataConfig
from contraseg.data import cache as cache_module
from contraseg.data.cache import prepare_dataset
from contraseg.data.readers import get_reader
from contraseg.errors import InputError

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]


def _config(root: Path, **kwargs) -> DataConfig:
    return DataConfig(
        dataset="phantom", root=str(root), size=[32, 32], target_spacing=[2, 2], **kwargs
    )


def _snapshot(cache_dir: Path) -> dict[str, int]:
    """Every file of the cache with its modification time."""
    files = (p for p in cache_dir.rglob("*") if p.is_file())
    return {str(p.relative_to(cache_dir)): p.stat().st_mtime_ns for p in files}


def test_contents_of_a_prepared_dataset(phantom_root: Path) -> None:
    prepared = prepare_dataset(_config(phantom_root), progress=False)
    assert prepared.cache_dir == phantom_root / ".contraseg-cache"
    assert prepared.reader_name == "phantom" and prepared.num_classes == 4
    assert prepared.class_names == ("background", "RV", "Myo", "LV") and prepared.in_channels == 1
    assert sorted(prepared.cases) == [f"patient{i:03d}" for i in range(1, 9)]
    reader = get_reader(_config(phantom_root))
    volume = reader.load(reader.list_cases(phantom_root)[0])
    case = prepared.cases["patient001"]
    assert isinstance(case.image, np.memmap) and case.image.dtype == np.float32
    assert case.image.shape == (volume.num_slices, 1, 32, 32) == (case.num_slices, 1, 32, 32)
    assert case.label is not None and case.label.dtype == np.uint8
    assert case.label.shape == (case.num_slices, 32, 32)
    np.testing.assert_array_equal(case.native_label, volume.label)
    assert case.grid.native_shape == volume.label.shape
    manifest = json.loads((prepared.cache_dir / "manifest.json").read_text())
    assert manifest["params"]["size"] == [32, 32]
    entry = manifest["cases"]["patient001"]
    assert {i["path"] for i in entry["inputs"]} == {
        "patient001/patient001_frame01.nii.gz",
        "patient001/patient001_frame01_gt.nii.gz",
        "patient001/Info.cfg",
    }
    assert all(i["size"] > 0 and i["mtime_ns"] > 0 for i in entry["inputs"])
    summary = prepared.summary()
    assert "8 labelled" in summary and "RV" in summary and "32 x 32" in summary


def test_second_run_does_nothing(phantom_root: Path) -> None:
    prepare_dataset(_config(phantom_root), progress=False)
    cache_dir = phantom_root / ".contraseg-cache"
    before = _snapshot(cache_dir)
    again = prepare_dataset(_config(phantom_root), progress=False)
    assert _snapshot(cache_dir) == before
    assert len(again.cases) == 8


def test_changed_input_reprepares_only_that_case(phantom_root: Path) -> None:
    first = prepare_dataset(_config(phantom_root), progress=False)
    label = phantom_root / "patient003" / "patient003_frame01_gt.nii.gz"
    stat = label.stat()
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = prepare_dataset(_config(phantom_root), progress=False)
    changed = [c for c in first.cases if first.cases[c].image_path != second.cases[c].image_path]
    assert changed == ["patient003"]
    assert not first.cases["patient003"].image_path.exists()  # stale files removed


def test_changed_params_reprepare_everything(phantom_root: Path) -> None:
    first = prepare_dataset(_config(phantom_root), progress=False)
    cfg = _config(phantom_root)
    cfg.size = [64, 32]
    second = prepare_dataset(cfg, progress=False)
    assert all(first.cases[c].image_path != second.cases[c].image_path for c in first.cases)
    assert second.cases["patient001"].image.shape[2:] == (64, 32)
    assert not any(c.image_path.exists() for c in first.cases.values())


def test_removed_case_and_custom_cache_dir(phantom_root: Path, tmp_path: Path) -> None:
    cfg = _config(phantom_root, cache=str(tmp_path / "elsewhere"))
    prepare_dataset(cfg, progress=False)
    assert (tmp_path / "elsewhere" / "manifest.json").is_file()
    assert not (phantom_root / ".contraseg-cache").exists()
    for path in (phantom_root / "patient008").iterdir():
        path.unlink()
    (phantom_root / "patient008").rmdir()
    prepared = prepare_dataset(cfg, progress=False)
    assert "patient008" not in prepared.cases
    assert not (tmp_path / "elsewhere" / "patient008").exists()


def test_deleted_cache_file_is_reprepared(phantom_root: Path) -> None:
    first = prepare_dataset(_config(phantom_root), progress=False)
    first.cases["patient002"].label_path.unlink()
    second = prepare_dataset(_config(phantom_root), progress=False)
    assert second.cases["patient002"].label_path.is_file()


def test_bad_case_leaves_no_cache(phantom_root: Path) -> None:
    label = phantom_root / "patient005" / "patient005_frame01_gt.nii.gz"
    label.write_bytes(label.read_bytes()[:100])
    with pytest.raises(InputError) as info:
        prepare_dataset(_config(phantom_root), progress=False)
    assert info.value.path == str(label)
    assert not (phantom_root / ".contraseg-cache").exists()


def test_failure_keeps_the_previous_cache_intact(phantom_root: Path) -> None:
    prepare_dataset(_config(phantom_root), progress=False)
    cache_dir = phantom_root / ".contraseg-cache"
    before = _snapshot(cache_dir)
    image = phantom_root / "patient004" / "patient004_frame01.nii.gz"
    image.write_bytes(b"\x1f\x8b garbage")
    cfg = _config(phantom_root)
    cfg.size = [64, 64]  # every case must be re-prepared: patient004 fails midway
    with pytest.raises(InputError):
        prepare_dataset(cfg, progress=False)
    assert _snapshot(cache_dir) == before


def test_interrupted_prepare_is_not_trusted(
    phantom_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = cache_module.preprocess_volume
    calls = []

    def interrupt_third(volume, params):
        calls.append(volume.case_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(volume, params)

    monkeypatch.setattr(cache_module, "preprocess_volume", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(_config(phantom_root), progress=False)
    assert not (phantom_root / ".contraseg-cache").exists()
    monkeypatch.setattr(cache_module, "preprocess_volume", real)
    assert len(prepare_dataset(_config(phantom_root), progress=False).cases) == 8


def test_unrecorded_files_are_neither_trusted_nor_deleted(phantom_root: Path) -> None:
    """The cache deletes only files its manifest names: anything else in a case folder (an
    orphan of a lost manifest, a user's file) stays, and is never read as a cached array."""
    first = prepare_dataset(_config(phantom_root), progress=False)
    folder = first.cache_dir / "patient001"
    orphan = folder / "image-0000000000000000.npy"
    np.save(orphan, np.zeros((1, 1, 2, 2), np.float32))
    (folder / "notes.txt").write_text("mine\n")
    cfg = _config(phantom_root)
    cfg.percentiles = [2.0, 98.0]
    second = prepare_dataset(cfg, progress=False)
    case = second.cases["patient001"]
    assert case.image_path != orphan and case.image.shape[2:] == (32, 32)
    expected = {orphan, folder / "notes.txt", case.image_path, case.label_path}
    assert set(folder.iterdir()) == expected | {case.native_label_path}


_KILL_THIRD_CASE = """
import os, sys
from contraseg.config import DataConfig
from contraseg.data import cache
real, calls = cache.preprocess_volume, []
def kill_third(volume, params):
    calls.append(volume.case_id)
    if len(calls) == 3:
        os._exit(9)  # a hard kill: no clean-up runs
    return real(volume, params)
cache.preprocess_volume = kill_third
config = DataConfig(dataset="phantom", root=sys.argv[1], size=[32, 32], target_spacing=[2, 2],
                    percentiles=[2.0, 98.0])
cache.prepare_dataset(config, progress=False)
"""


def test_files_of_a_killed_run_are_deleted_by_the_next(phantom_root: Path) -> None:
    """A hard kill leaves arrays that no manifest names; the journal (.pending.json) written
    before them lets the next run delete them, and nothing else."""
    first = prepare_dataset(_config(phantom_root), progress=False)
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_THIRD_CASE, str(phantom_root)], env=child_env(), check=False
    )
    assert killed.returncode == 9
    cache_dir = first.cache_dir
    assert (cache_dir / cache_module.PENDING).is_file()
    assert len(list(cache_dir.glob("*/*.npy"))) == 3 * 8 + 3 * 2  # two new cases written
    second = prepare_dataset(_config(phantom_root), progress=False)  # reuses the first run's
    kept = {
        path
        for case in second.cases.values()
        for path in (case.image_path, case.label_path, case.native_label_path)
    }
    assert set(cache_dir.glob("*/*.npy")) == kept
    assert sorted(p.name for p in cache_dir.iterdir() if p.is_file()) == [
        cache_module.MARKER,
        cache_module.MANIFEST,
    ]


@pytest.mark.parametrize("name", ["../victim.npy", "patient001/notes.txt", "/tmp/x/image.npy"])
def test_a_tampered_manifest_is_not_trusted(phantom_root: Path, tmp_path: Path, name: str) -> None:
    """Names read back from the manifest decide what is deleted: one that is not of the form
    the cache writes makes the whole manifest untrusted; every case is prepared again."""
    first = prepare_dataset(_config(phantom_root), progress=False)
    victim = first.cache_dir.parent / "victim.npy"
    victim.write_bytes(b"keep")
    (first.cache_dir / "patient001" / "notes.txt").write_text("keep\n")
    manifest_path = first.cache_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["cases"]["patient001"]["files"]["image"]["name"] = name
    manifest_path.write_text(json.dumps(manifest))
    cfg = _config(phantom_root)
    cfg.size = [64, 64]
    second = prepare_dataset(cfg, progress=False)
    assert second.cases["patient001"].image.shape[2:] == (64, 64)
    assert victim.read_bytes() == b"keep"
    assert (first.cache_dir / "patient001" / "notes.txt").is_file()
    assert first.cases["patient002"].image_path.exists()  # untrusted: not deleted either


_PREPARE = """
import sys
from contraseg.config import DataConfig
from contraseg.data.cache import prepare_dataset
config = DataConfig(dataset="phantom", root=sys.argv[1], size=[32, 32], target_spacing=[2, 2],
                    percentiles=[2.0, 98.0])
print(len(prepare_dataset(config, progress=False).cases))
"""


@pytest.mark.skipif(fcntl is None, reason="caches are locked on POSIX only")
def test_a_second_process_waits_for_the_one_preparing_the_cache(phantom_root: Path) -> None:
    """While one process holds the cache (here: the test, through the same lock), another one
    that prepares it says so and waits, then finishes with an intact cache."""
    first = prepare_dataset(_config(phantom_root), progress=False)
    fd = os.open(phantom_root, os.O_RDONLY)  # the folder above the default cache
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        child = subprocess.Popen(
            [sys.executable, "-c", _PREPARE, str(phantom_root)],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(3)
        assert child.poll() is None, child.communicate()
    finally:
        os.close(fd)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert "another process is preparing this cache; waiting" in err
    assert int(out) == len(first.cases)
    again = prepare_dataset(_config(phantom_root), progress=False)
    assert again.cases.keys() == first.cases.keys()
