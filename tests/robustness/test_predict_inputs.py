"""Hostile inputs to ``contraseg predict`` and ``contraseg evaluate``.

Every case must end with exit status 2 and one line naming the file, write nothing outside
``-o``/``--out`` and leave no half-written output there; a pickle payload must never run. The
hypothesis tests damage a scan's bytes and a model.json's values at random: the command
either succeeds with whole outputs or fails that way, never with a traceback.
"""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contraseg.config import FinetuneRun
from contraseg.inference.bundle import MODEL_JSON, WEIGHTS
from contraseg.training.stages import run_finetune

FUZZ = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_config) -> Path:
    """A finished tiny finetune run: a real bundle, copied into each sandbox before damage."""
    config = tiny_config(FinetuneRun, "optim.iterations=2", "finetune.val_every=1")
    run = run_finetune(config, tmp_path_factory.mktemp("robust") / "run")
    bundle = tmp_path_factory.mktemp("bundle")
    for name in (MODEL_JSON, WEIGHTS):
        shutil.copy(run / name, bundle / name)
    return bundle


def _scan(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> Path:
    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, (40, 36, 3)).astype(np.float32) if data is None else data
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(
        nib.Nifti1Image(data, np.diag([1.5, 1.5, 6.0, 1.0]) if affine is None else affine), path
    )
    return path


def _no_partial_files(folder: Path) -> None:
    """Only whole outputs: no temporary file of an atomic write is left behind."""
    if folder.exists():
        leftovers = [p.name for p in folder.rglob("*") if p.name.startswith(".")]
        assert not leftovers, leftovers


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# -- predict: bad scans --------------------------------------------------------------------------


def _corrupt(path: Path) -> None:
    path.write_bytes(b"\x00" * 20 + b"definitely not a NIfTI file")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _bad_crc(path: Path) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[-100] ^= 0xFF
    good = gzip.compress(bytes(raw))
    damaged = bytearray(good)
    damaged[-6] ^= 0xFF  # the stored CRC-32 no longer matches
    path.write_bytes(bytes(damaged))


def _five_d(path: Path) -> None:
    _scan(path, np.ones((8, 8, 2, 2, 2), np.float32))


def _one_d(path: Path) -> None:
    _scan(path, np.ones(30, np.float32))


def _two_channels(path: Path) -> None:
    _scan(path, np.ones((40, 36, 3, 2), np.float32))


def _nan_voxel(path: Path) -> None:
    data = np.ones((40, 36, 3), np.float32)
    data[3, 4, 1] = np.nan
    _scan(path, data)


def _zero_voxel_size(path: Path) -> None:
    """pixdim[2] (bytes 84..87 of the header) set to 0, as a broken converter writes it."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[84:88] = np.float32(0.0).tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))


def _huge_voxel_size(path: Path) -> None:
    """pixdim[1] of 1e6 mm: resampling to the model's spacing would need terabytes."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[80:84] = np.float32(1e6).tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))


def _rgb(path: Path) -> None:
    rgb = np.zeros((8, 8, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), path)


BAD_SCANS = [_corrupt, _truncated, _bad_crc, _five_d, _one_d, _two_channels, _nan_voxel,
             _zero_voxel_size, _huge_voxel_size, _rgb]  # fmt: skip


@pytest.mark.parametrize("damage", BAD_SCANS, ids=lambda f: f.__name__.strip("_"))
def test_bad_scan(sandbox, run_cli, trained, damage) -> None:
    scan = _scan(sandbox.root / "in" / "case.nii.gz")
    damage(scan)
    out = sandbox.root / "out"
    check = sandbox.watch([out])
    result = run_cli("predict", "-m", trained, "-i", scan, "-o", out)
    assert "case.nii.gz" in result.err
    check()
    assert not out.exists() or not any(out.iterdir())


def test_bad_scan_among_good_ones_fails_at_the_end(sandbox, run_cli, trained) -> None:
    _scan(sandbox.root / "in" / "a.nii.gz")
    _corrupt(_scan(sandbox.root / "in" / "b.nii.gz"))
    _scan(sandbox.root / "in" / "c.nii.gz")
    out = sandbox.root / "out"
    check = sandbox.watch([out])
    result = run_cli("predict", "-m", trained, "-i", sandbox.root / "in", "-o", out)
    assert "b.nii.gz" in result.err and "2 label maps written" in result.out
    check()
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "c.nii.gz"]
    for path in out.iterdir():
        assert nib.load(path).shape == (40, 36, 3)


def test_channel_files_on_different_grids(sandbox, run_cli, trained) -> None:
    """A 2-channel nnU-Net case given to a 1-channel model, its channels on two grids."""
    _scan(sandbox.root / "in" / "case_0000.nii.gz")
    _scan(sandbox.root / "in" / "case_0001.nii.gz", affine=np.diag([1.5, 1.5, 7.0, 1.0]))
    out = sandbox.root / "out"
    check = sandbox.watch([out])
    result = run_cli("predict", "-m", trained, "-i", sandbox.root / "in", "-o", out)
    assert "case_0001.nii.gz: affine differs" in result.err
    check()


def test_missing_channel_file(sandbox, run_cli, trained) -> None:
    _scan(sandbox.root / "in" / "case_0000.nii.gz")
    _scan(sandbox.root / "in" / "case_0002.nii.gz")
    out = sandbox.root / "out"
    check = sandbox.watch([out])
    assert (
        "case_0001 is missing"
        in run_cli("predict", "-m", trained, "-i", sandbox.root / "in", "-o", out).err
    )
    check()


def test_not_a_nifti_file(sandbox, run_cli, trained) -> None:
    png = sandbox.root / "scan.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    check = sandbox.watch([sandbox.root / "out"])
    assert (
        "not a NIfTI file"
        in run_cli("predict", "-m", trained, "-i", png, "-o", sandbox.root / "out").err
    )
    check()


# -- predict: bad bundles ------------------------------------------------------------------------


def _json_edit(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def damage(model: Path) -> None:
        obj = json.loads((model / MODEL_JSON).read_text())
        change(obj)
        (model / MODEL_JSON).write_text(json.dumps(obj))

    return damage


BAD_BUNDLES = {
    "model_json_truncated": (
        lambda m: (m / MODEL_JSON).write_text((m / MODEL_JSON).read_text()[:200]),
        "not valid JSON",
    ),
    "model_json_missing": (lambda m: (m / MODEL_JSON).unlink(), "model description not found"),
    "weights_missing": (lambda m: (m / WEIGHTS).unlink(), "weights not found"),
    "weights_truncated": (
        lambda m: (m / WEIGHTS).write_bytes((m / WEIGHTS).read_bytes()[:1000]),
        "not a readable safetensors",
    ),
    "num_classes_wrong_type": (
        _json_edit(lambda o: o["architecture"].update(num_classes="4")),
        "architecture.num_classes",
    ),
    "size_out_of_range": (
        _json_edit(lambda o: o["preprocessing"].update(size=[100, 32])),
        "preprocessing.size",
    ),
    "percentiles_out_of_range": (
        _json_edit(lambda o: o["preprocessing"].update(percentiles=[-5, 99])),
        "preprocessing.percentiles",
    ),
    "widths_do_not_match_weights": (
        _json_edit(lambda o: o["architecture"].update(widths=[4, 8, 8, 8, 8, 16])),
        "the architecture in model.json needs",
    ),
    "future_version": (_json_edit(lambda o: o.update(format_version=99)), "newer contraseg"),
}


@pytest.mark.parametrize("name", sorted(BAD_BUNDLES))
def test_bad_bundle(sandbox, run_cli, trained, name) -> None:
    damage, fragment = BAD_BUNDLES[name]
    model = Path(shutil.copytree(trained, sandbox.root / "model"))
    damage(model)
    scan = _scan(sandbox.root / "in" / "case.nii.gz")
    out = sandbox.root / "out"
    check = sandbox.watch([out])
    result = run_cli("predict", "-m", model, "-i", scan, "-o", out)
    assert fragment in result.err
    check()
    assert not out.exists()


@pytest.mark.parametrize("where", [WEIGHTS, MODEL_JSON])
@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_pickle_payload_never_runs(sandbox, run_cli, trained, where, kind) -> None:
    marker = sandbox.root / "marker"
    model = Path(shutil.copytree(trained, sandbox.root / "model"))
    if kind == "pickle":
        (model / where).write_bytes(pickle.dumps(_Payload(marker)))
    else:
        torch.save({"encoder.blocks.0.0.1.weight": _Payload(marker)}, model / where)
    scan = _scan(sandbox.root / "in" / "case.nii.gz")
    check = sandbox.watch([sandbox.root / "out"])
    assert where in run_cli("predict", "-m", model, "-i", scan, "-o", sandbox.root / "out").err
    assert not marker.exists()
    run_cli("evaluate", "--pred", sandbox.root / "in", "--ref", sandbox.root / "in",
            "--labels", model, "--out", sandbox.root / "out")  # fmt: skip
    assert not marker.exists()
    check()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--device", "tpu"], "is not a device"),
        (["--batch-size", "0"], "batch_size"),
        (["-m", "missing-model"], "model description not found"),
    ],
)
def test_bad_arguments(sandbox, run_cli, trained, argv, fragment) -> None:
    scan = _scan(sandbox.root / "in" / "case.nii.gz")
    check = sandbox.watch([sandbox.root / "out"])
    args = ["-m", trained, "-i", scan, "-o", sandbox.root / "out"]
    if argv[0] == "-m":
        args[1] = sandbox.root / argv[1]
        argv = []
    assert fragment in run_cli("predict", *args, *argv).err
    check()


def test_output_is_a_file(sandbox, run_cli, trained) -> None:
    scan = _scan(sandbox.root / "in" / "case.nii.gz")
    check = sandbox.watch()
    assert (
        "is not a folder"
        in run_cli("predict", "-m", trained, "-i", scan, "-o", sandbox.root / "precious.txt").err
    )
    check()


# -- fuzz ----------------------------------------------------------------------------------------


@FUZZ
@given(offset=st.integers(0, 10_000), value=st.integers(0, 255), cut=st.booleans())
def test_random_damage_to_a_scan(sandbox, run_cli, trained, offset, value, cut) -> None:
    folder = Path(tempfile.mkdtemp(dir=sandbox.root))
    scan = _scan(folder / "in" / "case.nii")
    raw = bytearray(scan.read_bytes())
    raw[offset % len(raw)] = value
    scan.write_bytes(bytes(raw[: offset % len(raw)] if cut else raw))
    out = folder / "out"
    check = sandbox.watch([out])
    result = run_cli("predict", "-m", trained, "-i", scan, "-o", out, codes=(0, 2))
    check()
    _no_partial_files(out)
    if result.code == 0:
        assert nib.load(out / "case.nii").shape == nib.load(scan).shape[:3]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a JSON object (dicts and list items)."""
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    )
    out = []
    for key, value in items:
        out.append((*prefix, key))
        out += _paths(value, (*prefix, key))
    return out


@FUZZ
@given(data=st.data())
def test_random_values_in_model_json(sandbox, run_cli, trained, data) -> None:
    obj = json.loads((trained / MODEL_JSON).read_text())
    path = data.draw(st.sampled_from(_paths(obj)))
    value = data.draw(JSON_VALUES)
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    folder = Path(tempfile.mkdtemp(dir=sandbox.root))
    model = Path(shutil.copytree(trained, folder / "model"))
    (model / MODEL_JSON).write_text(json.dumps(obj))
    scan = _scan(folder / "in" / "case.nii.gz")
    out = folder / "out"
    check = sandbox.watch([out])
    run_cli("predict", "-m", model, "-i", scan, "-o", out, codes=(0, 2))
    check()
    _no_partial_files(out)


# -- evaluate ------------------------------------------------------------------------------------


def _pair(sandbox) -> tuple[Path, Path]:
    label = np.zeros((20, 18, 4), np.uint8)
    label[4:9, 3:12, 1:3] = 1
    for side in ("pred", "ref"):
        _scan(sandbox.root / side / "a.nii.gz", label)
    return sandbox.root / "pred", sandbox.root / "ref"


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda p, r: _corrupt(p / "a.nii.gz"), "pred/a.nii.gz"),
        (lambda p, r: _truncated(r / "a.nii.gz"), "ref/a.nii.gz"),
        (lambda p, r: _scan(p / "b.nii.gz", np.zeros((20, 18, 4), np.uint8)), "has no reference"),
        (lambda p, r: _scan(r / "a.nii.gz", np.zeros((20, 18, 5), np.uint8)), "differs"),
        (lambda p, r: _five_d(p / "a.nii.gz"), "differs"),
        (lambda p, r: _scan(p / "a.nii.gz", np.ones((20, 18, 4, 2), np.uint8)), "label map"),
        (lambda p, r: _nan_voxel(r / "a.nii.gz"), "ref/a.nii.gz"),
    ],
)
def test_bad_evaluation_inputs(sandbox, run_cli, damage, fragment) -> None:
    pred, ref = _pair(sandbox)
    damage(pred, ref)
    out = sandbox.root / "scores"
    check = sandbox.watch([out])
    assert fragment in run_cli("evaluate", "--pred", pred, "--ref", ref, "--out", out).err
    check()
    assert not out.exists()


@pytest.mark.parametrize(
    "labels",
    ["{", '{"labels": []}', '{"labels": {"a": "b"}}', '{"labels": {"x": 1}}', "\u00ff\u00fe"],
)
def test_bad_labels_file(sandbox, run_cli, labels) -> None:
    pred, ref = _pair(sandbox)
    (sandbox.root / "dataset.json").write_text(labels)
    check = sandbox.watch([sandbox.root / "scores"])
    result = run_cli("evaluate", "--pred", pred, "--ref", ref, "--labels",
                     sandbox.root / "dataset.json", "--out", sandbox.root / "scores")  # fmt: skip
    assert "dataset.json" in result.err
    check()
