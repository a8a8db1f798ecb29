"""Writers of small datasets in each real layout, for the reader tests (``import reader_kit``;
tests/support is on pytest's path)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from contraseg import cli
from contraseg.config import PrepareRun, load_config
from contraseg.data.cache import PreparedDataset, prepare_dataset
from contraseg.data.sampling import PartitionSampler, RandomSliceSampler, SlicePool


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def axial_affine(spacing: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """An LPS-stored axial volume as scanners write it: x toward left, y toward posterior."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin
    return affine


def blob_label(shape: tuple[int, int, int], values: Sequence[int], seed: int) -> np.ndarray:
    """A label map with one box per value, placed at random but never empty."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.int16)
    for value in values:
        lo = [int(rng.integers(0, max(1, s // 2))) for s in shape]
        hi = [lo[i] + max(1, shape[i] // 3) for i in range(3)]
        label[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
    return label


def image_from_label(label: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (100.0 + 50.0 * label + rng.normal(0, 5, label.shape)).astype(np.float32)


# -- MSD Task05 Prostate -------------------------------------------------------------------


def write_prostate(root: Path, numbers: Sequence[int] = (0, 1, 2, 4), shape=(40, 36, 5)) -> Path:
    """Task05_Prostate: 4-D (T2, ADC) images at 0.625 x 0.625 x 3.6 mm, labels 0/1/2."""
    training = []
    for number in numbers:
        name = f"prostate_{number:02d}.nii.gz"
        label = blob_label(shape, (1, 2), seed=number)
        t2 = image_from_label(label, seed=number)
        adc = 2000.0 - 3 * t2  # distinguishable from T2
        affine = axial_affine((0.625, 0.625, 3.6), origin=(100.0, 90.0, -30.0))
        write_nifti(root / "imagesTr" / name, np.stack([t2, adc], axis=-1), affine)
        write_nifti(root / "labelsTr" / name, label.astype(np.uint8), affine)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "PROSTATE",
        "tensorImageSize": "4D",
        "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=4))
    return root


# -- MMWHS MR ------------------------------------------------------------------------------

MMWHS_RAW = (205, 420, 500, 550, 600, 820, 850)


def oblique_coronal_affine(spacing: Sequence[float], degrees: float = 12.0) -> np.ndarray:
    """A coronal acquisition tilted about the S axis: voxel axis 0 runs toward the patient's
    left, axis 1 toward inferior, axis 2 (the slices) toward anterior."""
    t = np.deg2rad(degrees)
    rotation = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    axes = np.column_stack([[-1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])  # L, I, A
    affine = np.eye(4)
    affine[:3, :3] = rotation @ axes @ np.diag(spacing)
    affine[:3, 3] = (60.0, -40.0, 25.0)
    return affine


def write_mmwhs(root: Path, numbers: Sequence[int] = (1001, 1002, 1003), shape=(30, 24, 20)):
    """mr_train_10XX_{image,label}.nii.gz with raw label values and an oblique coronal affine."""
    for number in numbers:
        label = blob_label(shape, MMWHS_RAW, seed=number)
        affine = oblique_coronal_affine((1.2, 1.0, 1.8))
        image = image_from_label((label > 0).astype(np.int16) * (number % 7 + 1), seed=number)
        write_nifti(root / f"mr_train_{number}_image.nii.gz", image, affine)
        write_nifti(root / f"mr_train_{number}_label.nii.gz", label, affine)
    return root


# -- nnU-Net raw v2 ------------------------------------------------------------------------


def write_nnunet(
    root: Path,
    train: Sequence[str] = ("case_000", "case_001", "case_002", "case_003"),
    unlabelled: Sequence[str] = ("case_100", "case_101"),
    channels: dict[str, str] | None = None,
    spacing: Sequence[float] = (0.8, 0.7, 3.0),
    shape=(40, 44, 6),
    test: Sequence[str] = ("case_200",),
) -> Path:
    """DatasetXXX_Name with dataset.json, imagesTr/labelsTr, imagesUnlabelled (pre-training)
    and imagesTs (to be segmented)."""
    channels = channels or {"0": "T2", "1": "ADC"}
    labels = {"background": 0, "lesion": 1, "organ": 2}
    for i, case in enumerate([*train, *unlabelled, *test]):
        label = blob_label(shape, (1, 2), seed=i)
        folder = "imagesTr" if case in train else "imagesTs"
        folder = "imagesUnlabelled" if case in unlabelled else folder
        for c in range(len(channels)):
            image = image_from_label(label, seed=10 * i + c) * (c + 1)
            write_nifti(root / folder / f"{case}_{c:04d}.nii.gz", image, axial_affine(spacing))
        if case in train:
            write_nifti(root / "labelsTr" / f"{case}.nii.gz", label, axial_affine(spacing))
    meta = {
        "channel_names": channels,
        "labels": labels,
        "numTraining": len(train),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=4))
    return root


# -- Cityscapes ----------------------------------------------------------------------------


def write_cityscapes(
    root: Path, per_city: int = 2, size: tuple[int, int] = (64, 128), seed: int = 0
) -> Path:
    """leftImg8bit/gtFine for train (aachen, bochum) and val (frankfurt); label ids in 4x4
    blocks so that nearest-neighbour down-scaling by 4 keeps each block's id."""
    rng = np.random.default_rng(seed)
    height, width = size
    for split, cities in (("train", ("aachen", "bochum")), ("val", ("frankfurt",))):
        for city in cities:
            for frame in range(per_city):
                stem = f"{city}_{frame:06d}_{19 + frame:06d}"
                ids = rng.integers(0, 34, (height // 4, width // 4)).astype(np.uint8)
                ids = np.kron(ids, np.ones((4, 4), dtype=np.uint8))
                rgb = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
                save_cityscapes_frame(root, split, city, stem, rgb, ids)
                colour = root / "gtFine" / split / city / f"{stem}_gtFine_color.png"
                Image.fromarray(rgb).save(colour)
    return root


def save_cityscapes_frame(
    root: Path, split: str, city: str, stem: str, rgb: np.ndarray, ids: np.ndarray
) -> None:
    """One frame in Cityscapes' layout: leftImg8bit/SPLIT/CITY/STEM_leftImg8bit.png and its
    label ids in gtFine/SPLIT/CITY/STEM_gtFine_labelIds.png."""
    for folder, name, array in (
        ("leftImg8bit", f"{stem}_leftImg8bit.png", rgb),
        ("gtFine", f"{stem}_gtFine_labelIds.png", ids),
    ):
        path = root / folder / split / city / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)


# -- command line --------------------------------------------------------------------------


def run_prepare(
    capsys: pytest.CaptureFixture[str], dataset: str, root: Path, *overrides: str
) -> tuple[int, str, str]:
    """``contraseg prepare`` in-process: exit status, stdout, stderr."""
    code = cli.main(["prepare", "--dataset", dataset, "--root", str(root), *overrides])
    out, err = capsys.readouterr()
    return code, out, err


def prepare_and_sample(
    capsys: pytest.CaptureFixture[str], dataset: str, root: Path, *overrides: str
) -> PreparedDataset:
    """Prepare through the command line, reload the cache and draw batches from it."""
    code, out, err = run_prepare(capsys, dataset, root, *overrides)
    assert code == 0, err
    assert "cases:" in out and "labels (preprocessed voxels):" in out
    shortcuts = [f"data.dataset={dataset}", f"data.root={root}"]
    config = load_config(PrepareRun, None, [*shortcuts, *overrides]).data
    prepared = prepare_dataset(config, progress=False)
    labelled = [c for c in prepared.cases.values() if c.label is not None]
    size = prepared.params.size
    for case in prepared.cases.values():
        assert case.image.shape == (case.num_slices, prepared.in_channels, *size)
        assert np.isfinite(case.image).all()
    for case in labelled:
        assert case.label.shape == (case.num_slices, *size)
        assert int(case.label.max()) < prepared.num_classes
    generator = torch.Generator().manual_seed(0)
    pool = SlicePool([c.image for c in labelled], [c.label for c in labelled])
    batch = RandomSliceSampler(pool, 4, generator).sample()
    assert batch.images.shape == (4, prepared.in_channels, *size)
    assert batch.labels is not None and batch.labels.shape == (4, *size)
    if min(c.num_slices for c in prepared.cases.values()) >= 2:
        pool = SlicePool([c.image for c in prepared.cases.values()])
        batch = PartitionSampler(pool, 2, 2, generator).sample()
        assert batch.images.shape == (4, prepared.in_channels, *size)
    return prepared


def expect_error(
    capsys: pytest.CaptureFixture[str], dataset: str, root: Path, names: str, *overrides: str
) -> str:
    """``prepare`` fails with status 2 and one error line naming ``names``; nothing is cached."""
    code, out, err = run_prepare(capsys, dataset, root, *overrides)
    assert code == 2, out
    errors = [line for line in err.splitlines() if line.startswith("contraseg:")]
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1], err
    assert names in errors[0], errors[0]
    assert not (root / ".contraseg-cache").exists()
    return errors[0]


def set_voxel(path: Path, index: tuple[int, int, int], value: float) -> None:
    """Rewrite one voxel of a NIfTI file in place, keeping its affine (to damage fixtures)."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    data[index] = value
    write_nifti(path, data, img.affine)


def assert_split_ids_exist(reader, root: Path, dataset: str) -> None:
    """Every case the packaged split of ``dataset`` names is one the reader lists."""
    from contraseg.data.splits import get_split

    ids = [c.case_id for c in reader.list_cases(root)]
    split = get_split(dataset, ids)
    named = [*split.pretrain, *split.test]
    named += [c for s in split.labelled.values() for c in (*s.train, *s.val)]
    split.check_available(ids, named)


def train_and_evaluate(out: Path, overrides: Sequence[str], *global_overrides: str):
    """A two-iteration stage 1, fine-tuning from its encoder, and the test-set evaluation."""
    from contraseg.config import FinetuneRun, PretrainGlobalRun, load_config
    from contraseg.evaluation.evaluate import evaluate_run
    from contraseg.training.stages import run_finetune, run_pretrain_global

    common = [*overrides, "model.widths=[4,8,8,8,8,8]", "model.g1_hidden=16", "optim.iterations=2"]
    pretrain = load_config(PretrainGlobalRun, None, [*common, *global_overrides])
    encoder_run = run_pretrain_global(pretrain, out / "global")
    finetune_overrides = [
        *common,
        "finetune.init=encoder",
        f"finetune.pretrained={encoder_run}",
        "optim.batch_size=2",
        "finetune.val_every=1",
    ]
    finetune = load_config(FinetuneRun, None, finetune_overrides)
    return evaluate_run(run_finetune(finetune, out / "ft"), device="cpu")
