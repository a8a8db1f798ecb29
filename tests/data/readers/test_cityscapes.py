"""Cityscapes: layout, /4 down-scaling, the supplement's 12 classes, split sizes, bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import reader_kit
from PIL import Image

from contraseg.config import DataConfig
from contraseg.data.readers import get_reader
from contraseg.data.readers.cityscapes import holdout_size, map_label_ids
from contraseg.errors import InputError

# Cityscapes labelIds (cityscapesScripts labels.py) -> the supplement's classes
EXPECTED = {7: 1, 8: 2, 11: 3, 12: 4, 21: 5, 22: 6, 23: 7, 24: 8, 25: 8, 26: 9, 32: 10, 33: 10}
EXPECTED |= {27: 11, 28: 12}


def _reader(root):
    return get_reader(DataConfig(dataset="cityscapes", root=str(root)))


def test_label_mapping_keeps_12_classes():
    ids = np.arange(34, dtype=np.uint8)
    mapped = map_label_ids(None, ids)
    for label_id in range(34):
        assert mapped[label_id] == EXPECTED.get(label_id, 0), label_id
    assert sorted(set(mapped.tolist())) == list(range(13))
    with pytest.raises(InputError, match=r"\[34, 255\]"):
        map_label_ids(None, np.array([0, 34, 255], dtype=np.uint8))


def test_lists_train_and_val(tmp_path):
    root = reader_kit.write_cityscapes(tmp_path / "cityscapes")
    cases = _reader(root).list_cases(root)
    assert [c.case_id for c in cases] == [
        "aachen_000000_000019",
        "aachen_000001_000020",
        "bochum_000000_000019",
        "bochum_000001_000020",
        "frankfurt_000000_000019",
        "frankfurt_000001_000020",
    ]
    reader = _reader(root)
    assert (reader.in_channels, reader.num_classes) == (3, 13)
    assert (reader.default_size, reader.default_spacing) == ((256, 512), (1.0, 1.0))


def test_load_downscales_by_four(tmp_path):
    root = reader_kit.write_cityscapes(tmp_path / "cityscapes", per_city=1)
    reader = _reader(root)
    case = reader.list_cases(root)[0]
    volume = reader.load(case)
    rgb = np.asarray(Image.open(case.image), dtype=np.float32)
    ids = np.asarray(Image.open(case.label))
    assert volume.image.shape == (16, 32, 1, 3) and volume.image.dtype == np.float32
    expected = rgb.reshape(16, 4, 32, 4, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(volume.image[:, :, 0], expected, rtol=1e-5)
    np.testing.assert_array_equal(volume.label[:, :, 0], map_label_ids(None, ids[::4, ::4]))
    assert volume.spacing == (1.0, 1.0, 1.0) and np.array_equal(volume.affine, np.eye(4))


def test_full_resolution_gives_256_by_512(tmp_path):
    root = tmp_path / "cityscapes"
    for sub, name, array in (
        ("leftImg8bit", "x_000000_000000_leftImg8bit.png", np.zeros((1024, 2048, 3), np.uint8)),
        ("gtFine", "x_000000_000000_gtFine_labelIds.png", np.full((1024, 2048), 7, np.uint8)),
    ):
        (root / sub / "val" / "x").mkdir(parents=True)
        Image.fromarray(array).save(root / sub / "val" / "x" / name)
    volume = _reader(root).load(_reader(root).list_cases(root)[0])
    assert volume.image.shape == (256, 512, 1, 3) and volume.label.shape == (256, 512, 1)
    assert np.all(volume.label == 1)


def test_split_sizes_scale_with_the_pool():
    assert holdout_size(3475) == 705
    assert holdout_size(100) == 20


def test_missing_label_and_unexpected_file(tmp_path):
    root = reader_kit.write_cityscapes(tmp_path / "cityscapes", per_city=1)
    (root / "gtFine" / "train" / "bochum" / "bochum_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(InputError, match="file not found") as err:
        _reader(root).list_cases(root)
    assert err.value.path.endswith("bochum_000000_000019_gtFine_labelIds.png")

    root = reader_kit.write_cityscapes(tmp_path / "other", per_city=1)
    (root / "leftImg8bit" / "val" / "frankfurt" / "notes.txt").write_text("")
    with pytest.raises(InputError, match="unexpected file") as err:
        _reader(root).list_cases(root)
    assert err.value.path.endswith("notes.txt")


def test_colour_label_or_grey_image_is_refused(tmp_path):
    root = reader_kit.write_cityscapes(tmp_path / "cityscapes", per_city=1)
    reader = _reader(root)
    case = reader.list_cases(root)[0]
    Image.open(case.image).convert("L").save(case.image)
    with pytest.raises(InputError, match="RGB") as err:
        reader.load(case)
    assert err.value.path == str(case.image)


def test_prepare_and_sample(tmp_path, capsys):
    root = reader_kit.write_cityscapes(tmp_path / "cityscapes")
    prepared = reader_kit.prepare_and_sample(capsys, "cityscapes", root, "data.size=[32,32]")
    case = prepared.cases["aachen_000000_000019"]
    assert case.image.shape == (1, 3, 32, 32) and case.label.shape == (1, 32, 32)
    # per-channel p1/p99 normalisation: each colour channel spans about [0, 1]
    for c in range(3):
        assert case.image[0, c].min() < 0.05 and case.image[0, c].max() > 0.95


def test_split_has_the_supplements_shape(tmp_path):
    root = tmp_path / "cityscapes"
    ids = []
    for i in range(60):  # 60 tiny images: X_ts 12, X_pre 48, labelled sizes scaled by 60 / 3475
        stem = f"zurich_{i:06d}_000019"
        for sub, name, array in (
            ("leftImg8bit", f"{stem}_leftImg8bit.png", np.zeros((4, 4, 3), np.uint8)),
            ("gtFine", f"{stem}_gtFine_labelIds.png", np.zeros((4, 4), np.uint8)),
        ):
            (root / sub / "train" / "zurich").mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / sub / "train" / "zurich" / name)
        ids.append(stem)
    split = _reader(root).split(seed=1)
    assert split == _reader(root).split(seed=1) != _reader(root).split(seed=2)
    assert len(split.test) == 12 and len(split.pretrain) == 48
    assert sorted(split.test + split.pretrain) == sorted(ids)
    sizes = {k: (len(s.train), len(s.val)) for k, s in split.labelled.items()}
    assert sizes == {
        **{f"tr1/c{j}": (2, 2) for j in (1, 2, 3)},
        **{f"tr2/c{j}": (3, 3) for j in (1, 2, 3)},
        **{f"tr8/c{j}": (7, 3) for j in (1, 2, 3)},
    }
    for labelled in split.labelled.values():
        assert set(labelled.train) | set(labelled.val) <= set(split.pretrain)
        assert not set(labelled.train) & set(labelled.val)
    assert len(split.benchmark.train) == 45 and split.benchmark.val == split.labelled["tr8/c1"].val


def _missing_label(root):
    (root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000019_gtFine_labelIds.png").unlink()
    return "frankfurt_000000_000019_gtFine_labelIds.png: file not found"


def _no_gtfine(root):
    shutil.rmtree(root / "gtFine")
    return "gtFine: folder not found"


def _bad_label_id(root):
    path = root / "gtFine" / "train" / "bochum" / "bochum_000000_000019_gtFine_labelIds.png"
    Image.fromarray(np.full((64, 128), 40, np.uint8)).save(path)
    return "bochum_000000_000019_gtFine_labelIds.png: label ids [40]"


def _colour_label(root):
    path = root / "gtFine" / "train" / "bochum" / "bochum_000000_000019_gtFine_labelIds.png"
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(path)
    return "bochum_000000_000019_gtFine_labelIds.png: expected one band"


def _corrupt_image(root):
    path = root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    path.write_bytes(path.read_bytes()[:100])
    return "aachen_000000_000019_leftImg8bit.png: cannot read PNG"


def _stray_file(root):
    (root / "leftImg8bit" / "train" / "aachen" / "aachen_000009_000019.png").write_bytes(b"")
    return "aachen_000009_000019.png: unexpected file"


DAMAGES = [_missing_label, _no_gtfine, _bad_label_id, _colour_label, _corrupt_image, _stray_file]


@pytest.mark.parametrize("damage", DAMAGES)
def test_bad_input_via_cli(tmp_path, capsys, damage):
    root = reader_kit.write_cityscapes(tmp_path / "cityscapes", per_city=1)
    reader_kit.expect_error(capsys, "cityscapes", root, damage(root), "data.size=[32,32]")


def test_colour_images_train_through_the_same_unet(tmp_path):
    """3-channel input: G^R pre-training, fine-tuning from its encoder, evaluation."""
    root = reader_kit.write_cityscapes(tmp_path / "cityscapes", per_city=4)
    data = ["data.dataset=cityscapes", f"data.root={root}", "data.size=[32,32]"]
    summary = reader_kit.train_and_evaluate(tmp_path, data, "loss.strategy=GR")
    assert len(summary.class_names) == 12
    assert 0.0 <= summary.mean_dice <= 1.0
