"""``evaluate --pred --ref``: matching by case name, grids, class names, the absent-class rule."""

from __future__ import annotations

import json
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from contraseg.cli import main
from contraseg.errors import InputError
from contraseg.evaluation import evaluate_folders, mean_case_dice
from contraseg.evaluation.metrics import dice_per_class, hd95_per_class, summarise_hd95
from contraseg.inference.bundle import (
    Architecture,
    ModelBundle,
    Preprocessing,
    Provenance,
)

AFFINE = np.diag([0.8, 0.9, 3.0, 1.0])


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _volume(values: tuple[int, ...], shift: int = 0, shape=(20, 18, 4)) -> np.ndarray:
    out = np.zeros(shape, np.uint16)
    for i, value in enumerate(values):
        out[2 + 4 * i + shift : 5 + 4 * i + shift, 3:12, 1:3] = value
    return out


def _bundle_folder(folder: Path, values: tuple[int, ...], absent: str) -> Path:
    ModelBundle(
        architecture=Architecture((4, 8, 8, 8, 8, 8), 1, len(values)),
        class_names=("background", *(f"c{v}" for v in values[1:])),
        label_values=values,
        preprocessing=Preprocessing((1.0, 1.0), (32, 32), (1.0, 99.0), False, None, "as_stored"),
        provenance=Provenance("x", "custom", (), (), "random", "", 0, None, None, "t", ""),
        absent_classes=absent,  # type: ignore[arg-type]
    ).write(folder)
    return folder


def test_mmwhs_names_and_raw_values(tmp_path):
    """Predictions named after the images (``_image``) against ``_label`` references beside
    the images, raw values above 255 mapped to classes through the model bundle."""
    values = (0, 205, 420, 850)
    for n, shift in ((1001, 0), (1002, 1)):
        _save(tmp_path / "ref" / f"mr_train_{n}_image.nii.gz", np.ones((20, 18, 4), np.float32))
        _save(tmp_path / "ref" / f"mr_train_{n}_label.nii.gz", _volume(values[1:]))
        _save(tmp_path / "pred" / f"mr_train_{n}_image.nii.gz", _volume(values[1:], shift))
    bundle = _bundle_folder(tmp_path / "model", values, "count_as_one")
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", labels=bundle)
    assert [c.case_id for c in summary.cases] == ["mr_train_1001", "mr_train_1002"]
    assert summary.cases[0].dice == (1.0, 1.0, 1.0)
    assert summary.class_names == ("c205", "c420", "c850")
    assert summary.cases[1].mean_dice == pytest.approx(2 / 3)  # 3 of 4 rows overlap
    assert summary.cases[1].hd95 == pytest.approx((0.8, 0.8, 0.8))  # one voxel along x


def test_acdc_references_beside_their_images(tmp_path):
    patient = tmp_path / "ref" / "patient101"
    _save(patient / "patient101_frame01.nii.gz", np.ones((20, 18, 4), np.float32))
    _save(patient / "patient101_frame01_gt.nii.gz", _volume((1, 2, 3)))
    _save(tmp_path / "pred" / "patient101_frame01.nii.gz", _volume((1, 2, 3)))
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    assert summary.class_names == ("1", "2", "3") and summary.mean_dice == 1.0


def _labels_json(path: Path, labels: dict) -> Path:
    path.write_text(json.dumps({"labels": labels}))
    return path


def test_class_names_from_dataset_json(tmp_path):
    _save(tmp_path / "ref" / "a.nii.gz", _volume((1, 2)))
    _save(tmp_path / "pred" / "a.nii.gz", _volume((1, 2), 1))
    nnunet = _labels_json(tmp_path / "nn.json", {"background": 0, "lesion": 1, "organ": 2})
    msd = _labels_json(tmp_path / "msd.json", {"0": "background", "1": "PZ", "2": "TZ", "3": "X"})
    assert evaluate_folders(tmp_path / "pred", tmp_path / "ref", nnunet).class_names == (
        "lesion",
        "organ",
    )
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", msd)
    assert summary.class_names == ("PZ", "TZ", "X")
    assert summary.cases[0].dice[2] == 1.0  # absent from both: the medical rule scores 1
    for bad, fragment in (
        ({"a": 1, "b": 2}, "background value 0"),
        ({"background": 0, "a": 1, "b": 1}, "distinct"),
    ):
        with pytest.raises(InputError, match=fragment):
            evaluate_folders(
                tmp_path / "pred", tmp_path / "ref", _labels_json(tmp_path / "b.json", bad)
            )
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="cannot read class labels"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "broken.json")
    only_one = _labels_json(tmp_path / "one.json", {"background": 0, "lesion": 1})
    with pytest.raises(InputError, match=r"label values \[2\] are not among \[0, 1\]"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", only_one)


def test_leave_out_rule_travels_with_the_bundle(tmp_path):
    """Cityscapes' rule: a class in neither prediction nor reference is not scored."""
    _save(tmp_path / "ref" / "a.nii.gz", _volume((1,)))
    _save(tmp_path / "pred" / "a.nii.gz", _volume((1,), 1))
    _save(tmp_path / "ref" / "b.nii.gz", _volume((1, 2)))
    _save(tmp_path / "pred" / "b.nii.gz", _volume((1, 2)))
    medical = evaluate_folders(
        tmp_path / "pred",
        tmp_path / "ref",
        _bundle_folder(tmp_path / "m1", (0, 1, 2), "count_as_one"),
    )
    street = evaluate_folders(
        tmp_path / "pred", tmp_path / "ref", _bundle_folder(tmp_path / "m2", (0, 1, 2), "leave_out")
    )
    assert medical.cases[0].dice == (2 / 3, 1.0)
    assert street.cases[0].dice[0] == pytest.approx(2 / 3) and np.isnan(street.cases[0].dice[1])
    assert street.cases[0].mean_dice == pytest.approx(2 / 3)
    assert medical.cases[0].mean_dice == pytest.approx(5 / 6)
    assert street.per_class_dice["c2"] == 1.0  # the mean over the images where c2 is scored
    assert street.hd95.undefined == 0  # a left-out class is not an undefined HD95
    summary = json.loads((tmp_path / "pred" / "evaluation" / "summary.json").read_text())
    assert summary["per_case"][0]["dice"]["c2"] is None


def test_metrics_under_the_leave_out_rule():
    ref = np.zeros((6, 6, 6), np.int64)
    pred = ref.copy()
    ref[1:3, 1:3, 1:3] = 1
    pred[4:, 4:, 4:] = 2
    dice = dice_per_class(pred, ref, 4, "leave_out")
    np.testing.assert_array_equal(dice[:2], [0.0, 0.0])
    assert np.isnan(dice[2])
    hd95 = hd95_per_class(pred, ref, (1.0, 1.0, 1.0), 4, "leave_out")
    assert np.isnan(hd95).all()
    summary = summarise_hd95(hd95[None], scored=~np.isnan(dice)[None])
    assert summary.undefined == 2


def test_model_selection_uses_the_models_rule():
    """``mean_case_dice`` (fine-tuning's validation score) applies the bundle's rule."""
    ref = np.zeros((4, 4, 2), np.int16)
    ref[:2] = 1
    pred = ref.copy()
    pred[0] = 0
    case = types.SimpleNamespace(native_label=ref)

    def segmenter(rule: str) -> types.SimpleNamespace:
        bundle = types.SimpleNamespace(absent_classes=rule)
        return types.SimpleNamespace(bundle=bundle, predict_case=lambda _: pred)

    assert mean_case_dice(segmenter("count_as_one"), [case], 3) == pytest.approx((2 / 3 + 1) / 2)
    assert mean_case_dice(segmenter("leave_out"), [case], 3) == pytest.approx(2 / 3)


def test_2d_label_maps(tmp_path):
    _save(tmp_path / "ref" / "a.nii.gz", _volume((1, 2))[:, :, 1])
    _save(tmp_path / "pred" / "a.nii.gz", _volume((1, 2))[:, :, 1])
    assert evaluate_folders(tmp_path / "pred", tmp_path / "ref").mean_dice == 1.0


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main(["evaluate", *map(str, argv)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        (lambda t: (t / "ref" / "b.nii.gz").unlink(), ["pred/b.nii.gz: has no reference", "ref"]),
        (lambda t: (t / "pred" / "b.nii.gz").unlink(), ["ref/b.nii.gz: has no prediction", "pred"]),
        (
            lambda t: _save(t / "pred" / "b.nii.gz", _volume((1,), shape=(20, 18, 5))),
            ["pred/b.nii.gz: shape (20, 18, 5) differs from (20, 18, 4) of", "ref/b.nii.gz"],
        ),
        (
            lambda t: _save(t / "pred" / "b.nii.gz", _volume((1,)), np.diag([0.8, 0.9, 3.3, 1])),
            ["pred/b.nii.gz: affine differs from that of", "ref/b.nii.gz"],
        ),
        (
            lambda t: _save(t / "pred" / "b.nii", _volume((1,))),
            ["case name 'b' is also used by"],
        ),
        (
            lambda t: _save(t / "pred" / "b.nii.gz", _volume((1,)).astype(np.float32) * 0.5),
            ["non-integer"],
        ),
        (
            lambda t: [_save(p, np.zeros((20, 18, 4), np.uint8)) for p in t.rglob("*.nii.gz")],
            ["no foreground class"],
        ),
        (lambda t: (t / "pred" / "b.nii.gz").write_bytes(b"garbage"), ["pred/b.nii.gz"]),
    ],
)
def test_mismatches_are_one_line_errors_naming_the_files(tmp_path, capsys, damage, fragments):
    for case in ("a", "b"):
        _save(tmp_path / "ref" / f"{case}.nii.gz", _volume((1,)))
        _save(tmp_path / "pred" / f"{case}.nii.gz", _volume((1,)))
    damage(tmp_path)
    code, err = _cli(capsys, "--pred", tmp_path / "pred", "--ref", tmp_path / "ref")
    assert code == 2 and len(err.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "pred" / "evaluation").exists()


def test_argument_errors(tmp_path, capsys):
    assert _cli(capsys, "--pred", tmp_path)[0] == 2
    assert _cli(capsys, "--run", tmp_path, "--pred", tmp_path, "--ref", tmp_path)[0] == 2
    code, err = _cli(capsys, "--pred", tmp_path / "none", "--ref", tmp_path)
    assert code == 2 and "prediction folder not found" in err
