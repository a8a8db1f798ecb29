"""nnU-Net raw v2: listing, channels, unlabelled images, splits, derived defaults, bad input."""

from __future__ import annotations

import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import reader_kit

from contraseg.config import DataConfig
from contraseg.data.cache import prepare_dataset
from contraseg.data.phantom import write_phantom_dataset
from contraseg.data.readers import get_reader
from contraseg.data.readers.acdc import read_info
from contraseg.data.splits import LabelledSet
from contraseg.errors import InputError


def _reader(root, **kwargs):
    return get_reader(DataConfig(dataset="nnunet", root=str(root), **kwargs))


def test_lists_labelled_and_unlabelled_cases(tmp_path):
    root = reader_kit.write_nnunet(tmp_path / "Dataset042_Pelvis")
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


def test_channels_are_stacked_in_order(tmp_path):
    root = reader_kit.write_nnunet(tmp_path / "Dataset042_Pelvis")
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


def test_derived_spacing_and_size(tmp_path):
    # median in-plane spacing (0.8, 0.7); extent 40 * 0.8 = 32 mm, 44 * 0.7 = 30.8 mm
    root = reader_kit.write_nnunet(tmp_path / "Dataset042_Pelvis")
    reader = _reader(root)
    assert reader.default_spacing == pytest.approx((0.8, 0.7))
    assert reader.default_size == (64, 64)  # ceil(40 / 32) * 32, ceil(44 / 32) * 32
    # with a finer target spacing from the config the derived size follows it
    assert _reader(root, target_spacing=[0.25, 0.25]).default_size == (128, 128)


def test_single_channel_dataset(tmp_path):
    root = reader_kit.write_nnunet(tmp_path / "Dataset001_CT", channels={"0": "CT"}, test=())
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
def test_bad_dataset_json(tmp_path, edit, problem):
    root = reader_kit.write_nnunet(tmp_path / "Dataset042_Pelvis")
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(edit(meta))
    with pytest.raises(InputError, match=problem) as err:
        _reader(root).list_cases(root)
    assert err.value.path.endswith("dataset.json")


def test_missing_and_unexpected_files(tmp_path):
    root = reader_kit.write_nnunet(tmp_path / "Dataset042_Pelvis")
    (root / "imagesTr" / "case_002_0001.nii.gz").unlink()
    with pytest.raises(InputError, match="file not found") as err:
        _reader(root).list_cases(root)
    assert err.value.path.endswith("imagesTr/case_002_0001.nii.gz")

    root = reader_kit.write_nnunet(tmp_path / "Dataset043_Pelvis")
    (root / "imagesTr" / "case_002_0002.nii.gz").write_bytes(b"")  # a third channel
    with pytest.raises(InputError, match="unexpected file") as err:
        _reader(root).list_cases(root)
    assert err.value.path.endswith("imagesTr/case_002_0002.nii.gz")

    root = reader_kit.write_nnunet(tmp_path / "Dataset044_Pelvis")
    (root / "labelsTr" / "case_003.nii.gz").unlink()
    with pytest.raises(InputError, match="file not found") as err:
        _reader(root).list_cases(root)
    assert err.value.path.endswith("labelsTr/case_003.nii.gz")

    root = reader_kit.write_nnunet(tmp_path / "Dataset045_Pelvis")
    (root / "labelsTr" / "case_009.nii.gz").write_bytes(b"")
    (root / "imagesTr" / ".DS_Store").write_bytes(b"")  # hidden files are skipped
    with pytest.raises(InputError, match="unexpected file") as err:
        _reader(root).list_cases(root)
    assert err.value.path.endswith("labelsTr/case_009.nii.gz")


def test_undeclared_label_and_affine_mismatch(tmp_path):
    root = reader_kit.write_nnunet(tmp_path / "Dataset042_Pelvis", test=())
    path = root / "labelsTr" / "case_000.nii.gz"
    reader_kit.set_voxel(path, (0, 0, 0), 7)
    reader = _reader(root)
    with pytest.raises(InputError, match=r"\[7\] are not declared in dataset.json") as err:
        reader.load(reader.list_cases(root)[0])
    assert err.value.path == str(path)

    channel = root / "imagesTr" / "case_001_0001.nii.gz"
    img = nib.load(str(channel))
    tilted = img.affine.copy()
    tilted[0, 1] = 0.05  # a shear no header rounding explains
    reader_kit.write_nifti(channel, np.asarray(img.dataobj), tilted)
    with pytest.raises(InputError, match="affine differs") as err:
        reader.load(reader.list_cases(root)[1])
    assert err.value.path == str(channel)


def test_affine_rounding_is_tolerated(tmp_path):
    root = reader_kit.write_nnunet(tmp_path / "Dataset042_Pelvis", test=())
    path = root / "labelsTr" / "case_000.nii.gz"
    img = nib.load(str(path))
    nudged = img.affine.copy()
    nudged[:3, :3] *= 1 + 1e-5
    reader_kit.write_nifti(path, np.asarray(img.dataobj), nudged)
    reader = _reader(root)
    assert reader.load(reader.list_cases(root)[0]).label is not None


def test_prepare_and_sample_with_derived_defaults(tmp_path, capsys):
    root = reader_kit.write_nnunet(tmp_path / "Dataset042_Pelvis")
    prepared = reader_kit.prepare_and_sample(capsys, "nnunet", root)
    assert prepared.params.target_spacing == pytest.approx((0.8, 0.7))
    assert prepared.params.size == (64, 64)
    assert prepared.cases["case_100"].label is None
    assert prepared.cases["case_000"].image.shape == (6, 2, 64, 64)


def _labelled_ids(n):
    return tuple(f"case_{i:03d}" for i in range(n))


def test_generated_split_keeps_unlabelled_cases_in_pretraining(tmp_path):
    root = reader_kit.write_nnunet(
        tmp_path / "Dataset042_Pelvis", train=_labelled_ids(8), shape=(8, 8, 2)
    )
    split = _reader(root).split(seed=3)
    assert split == _reader(root).split(seed=3)
    assert {"case_100", "case_101"} <= set(split.pretrain)
    used = [*split.test, *split.pretrain_val]
    used += [c for s in split.labelled.values() for c in (*s.train, *s.val)]
    assert not {"case_100", "case_101"} & set(used)
    assert split.labelled_set(1, "c1").train[0] in split.pretrain
    assert set(split.test).isdisjoint(split.pretrain)


def test_splits_final_fold_gives_train_and_val_as_nnunet_reads_it(tmp_path):
    root = reader_kit.write_nnunet(
        tmp_path / "Dataset042_Pelvis", train=_labelled_ids(10), shape=(8, 8, 2)
    )
    ids = _labelled_ids(10)
    folds = [{"train": list(ids[2:]), "val": list(ids[:2])}, {"train": list(ids[:7]), "val": []}]
    (root / "splits_final.json").write_text(json.dumps(folds))
    split = _reader(root).split(seed=0)
    assert split.test == ()
    assert set(split.benchmark.train) == set(ids[2:]) and split.benchmark.val == tuple(ids[:2])
    assert all(s.val == tuple(ids[:2]) for s in split.labelled.values())
    assert set(split.labelled_set(8, "c1").train) <= set(ids[2:])
    assert set(split.pretrain) == set(ids) | {"case_100", "case_101"}

    second = _reader(root, fold=1).split(seed=0)
    assert set(second.benchmark.train) == set(ids[:7]) and second.benchmark.val == ()
    assert second.labelled_set(1, "c1").val == ()


@pytest.mark.parametrize(
    ("folds", "fold", "message"),
    [
        ([{"train": [], "val": ["case_777"]}], 0, "case_777"),
        ([{"train": ["case_000"], "val": ["case_000"]}], 0, "in both train and val"),
        ([{"train": ["case_000"], "val": []}], 3, "data.fold=3, but the file has folds 0..0"),
        ({"train": []}, 0, "expected a list of folds"),
    ],
)
def test_bad_splits_final_names_the_file(tmp_path, folds, fold, message):
    root = reader_kit.write_nnunet(tmp_path / "Dataset042_Pelvis", shape=(8, 8, 2))
    (root / "splits_final.json").write_text(json.dumps(folds))
    with pytest.raises(InputError, match=message) as err:
        _reader(root, fold=fold).split(seed=0)
    assert err.value.path.endswith("splits_final.json")


def test_imagests_is_not_pretraining_data_unless_listed(tmp_path):
    root = reader_kit.write_nnunet(
        tmp_path / "Dataset042_Pelvis", shape=(8, 8, 2), test=("case_200",)
    )
    assert "case_200" not in {c.case_id for c in _reader(root).list_cases(root)}
    listed = _reader(root, unlabelled=["imagesTs"]).list_cases(root)
    assert ("case_200", False) in [(c.case_id, c.label is not None) for c in listed]
    globbed = _reader(root, unlabelled=["imagesTs/*_0000.nii.gz"]).list_cases(root)
    assert [c.case_id for c in globbed if c.label is None][-1] == "case_200"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("nowhere/*.nii.gz", "no folder or file matches"),
        ("imagesUnlabelled", "is also used by"),
        ("dataset.json", "expected {case}_{0000..}"),
    ],
)
def test_bad_unlabelled_entries_name_the_path(tmp_path, entry, message):
    root = reader_kit.write_nnunet(tmp_path / "Dataset042_Pelvis", shape=(8, 8, 2))
    with pytest.raises(InputError, match=re.escape(message)):
        _reader(root, unlabelled=[entry]).list_cases(root)


def test_a_generated_split_works_from_one_labelled_case(tmp_path):
    root = reader_kit.write_nnunet(
        tmp_path / "Dataset042_Pelvis", train=["case_000"], shape=(8, 8, 2)
    )
    split = _reader(root).split(seed=0)
    assert split.test == () and split.labelled_set(1, "c1") == LabelledSet(("case_000",), ())
    assert set(split.pretrain) == {"case_000", "case_100", "case_101"}


def _phantom_as_nnunet(phantom, out):
    """ACDC-layout phantom -> Dataset001_Phantom: the ED frame of each patient, as a user would
    convert it by hand."""
    patients = sorted(p for p in phantom.iterdir() if p.name.startswith("patient"))
    for folder in patients:
        ed = read_info(folder / "Info.cfg")["ED"]
        stem = f"{folder.name}_frame{ed:02d}"
        (out / "imagesTr").mkdir(parents=True, exist_ok=True)
        (out / "labelsTr").mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / f"{stem}.nii.gz", out / "imagesTr" / f"{folder.name}_0000.nii.gz")
        shutil.copy(folder / f"{stem}_gt.nii.gz", out / "labelsTr" / f"{folder.name}.nii.gz")
    meta = {
        "channel_names": {"0": "cineMRI"},
        "labels": {"background": 0, "RV": 1, "Myo": 2, "LV": 3},
        "numTraining": len(patients),
        "file_ending": ".nii.gz",
    }
    (out / "dataset.json").write_text(json.dumps(meta))
    return out


def test_phantom_in_nnunet_format_gives_the_acdc_readers_arrays(tmp_path):
    phantom = tmp_path / "phantom"
    write_phantom_dataset(phantom, volumes=3, size=40, seed=0)
    root = _phantom_as_nnunet(phantom, tmp_path / "Dataset001_Phantom")
    acdc = prepare_dataset(DataConfig(dataset="phantom", root=str(phantom)), progress=False)
    same = {"target_spacing": list(acdc.params.target_spacing), "size": list(acdc.params.size)}
    nnunet = prepare_dataset(DataConfig(dataset="nnunet", root=str(root), **same), progress=False)
    assert nnunet.class_names == acdc.class_names and nnunet.params == acdc.params
    assert sorted(nnunet.cases) == sorted(acdc.cases) == ["patient001", "patient002", "patient003"]
    for case_id, theirs in acdc.cases.items():
        ours = nnunet.cases[case_id]
        np.testing.assert_array_equal(ours.image, theirs.image)
        np.testing.assert_array_equal(ours.label, theirs.label)
        np.testing.assert_array_equal(ours.native_label, theirs.native_label)
        assert ours.grid == theirs.grid


def _invalid_json(root):
    (root / "dataset.json").write_text('{"channel_names": {"0": "T2"}, "labels": ')
    return "dataset.json: not valid JSON"


def _no_labels_key(root):
    meta = json.loads((root / "dataset.json").read_text())
    del meta["labels"]
    (root / "dataset.json").write_text(json.dumps(meta))
    return "dataset.json: missing required key 'labels'"


def _undeclared_value(root):
    path = root / "labelsTr" / "case_002.nii.gz"
    reader_kit.set_voxel(path, (3, 3, 2), 3)
    return "labelsTr/case_002.nii.gz: label values [3] are not declared in dataset.json"


def _rotated_label(root):
    path = root / "labelsTr" / "case_001.nii.gz"
    img = nib.load(str(path))
    reader_kit.write_nifti(
        path, np.asarray(img.dataobj), np.diag([0.8, 0.7, 3.0, 1.0])
    )  # RAS, not LPS
    return "labelsTr/case_001.nii.gz: affine differs"


def _missing_channel(root):
    (root / "imagesUnlabelled" / "case_101_0001.nii.gz").unlink()
    return "imagesUnlabelled/case_101_0001.nii.gz: file not found"


def _stray_label(root):
    shutil.copy(root / "labelsTr" / "case_000.nii.gz", root / "labelsTr" / "case_000 copy.nii.gz")
    return "labelsTr/case_000 copy.nii.gz: unexpected file"


@pytest.mark.parametrize(
    "damage",
    [_invalid_json, _no_labels_key, _undeclared_value, _rotated_label, _missing_channel,
     _stray_label],
)  # fmt: skip
def test_bad_input_via_cli(tmp_path, capsys, damage):
    root = reader_kit.write_nnunet(tmp_path / "Dataset042_Pelvis", shape=(16, 16, 3))
    reader_kit.expect_error(capsys, "nnunet", root, damage(root))


def test_nnunet_dataset_trains_with_its_unlabelled_images(tmp_path):
    """Unlabelled images join the pre-training pool; fine-tuning and testing use labelled ones."""
    from contraseg.config import PretrainGlobalRun, load_config
    from contraseg.data.dataset import load_dataset

    phantom = tmp_path / "phantom"
    write_phantom_dataset(phantom, volumes=16, size=40, seed=1)
    root = _phantom_as_nnunet(phantom, tmp_path / "Dataset002_Phantom")
    (root / "imagesUnlabelled").mkdir()
    for case in ("patient014", "patient015", "patient016"):
        (root / "imagesTr" / f"{case}_0000.nii.gz").rename(
            root / "imagesUnlabelled" / f"{case}_0000.nii.gz"
        )
        (root / "labelsTr" / f"{case}.nii.gz").unlink()
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": 13}))

    data = [
        "data.dataset=nnunet",
        f"data.root={root}",
        "data.size=[32,32]",
        "data.target_spacing=[3.0,3.0]",
    ]
    _, split = load_dataset(load_config(PretrainGlobalRun, None, data).data)
    unlabelled = {"patient014", "patient015", "patient016"}
    assert unlabelled <= set(split.pretrain)
    assert not unlabelled & {*split.test, *split.labelled_set(1, "c1").train}
    summary = reader_kit.train_and_evaluate(tmp_path, data, "loss.volumes_per_batch=2")
    assert [case.case_id for case in summary.cases] == list(split.test)
