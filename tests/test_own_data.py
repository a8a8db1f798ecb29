"""Your own data, end to end: an nnU-Net raw dataset with one labelled case and no test set,
pre-trained on its unlabelled images, fine-tuned on that one case, then its imagesTs segmented
(docs/own-data.md)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from contraseg.cli import main
from contraseg.data.phantom import write_phantom_dataset

SMALL = ["data.size=32", "data.target_spacing=3", "model.widths=[4,8,8,8,8,8]"]


def _own_dataset(tmp_path):
    """Dataset001_Heart: patient001 labelled, 002-007 unlabelled, 008-009 to be segmented."""
    phantom = tmp_path / "phantom"
    write_phantom_dataset(phantom, volumes=9, size=40, seed=5)
    root = tmp_path / "Dataset001_Heart"
    for folder in ("imagesTr", "labelsTr", "imagesUnlabelled", "imagesTs"):
        (root / folder).mkdir(parents=True)
    for i in range(1, 10):
        pid = f"patient{i:03d}"
        folder = "imagesTr" if i == 1 else "imagesUnlabelled" if i < 8 else "imagesTs"
        shutil.copy(phantom / pid / f"{pid}_frame01.nii.gz", root / folder / f"{pid}_0000.nii.gz")
    shutil.copy(
        phantom / "patient001" / "patient001_frame01_gt.nii.gz",
        root / "labelsTr" / "patient001.nii.gz",
    )
    meta = {
        "channel_names": {"0": "cine"},
        "labels": {"background": 0, "RV": 1, "Myo": 2, "LV": 3},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.mark.slow
def test_one_labelled_case_to_predictions_of_new_scans(tmp_path, capsys) -> None:
    root = _own_dataset(tmp_path)
    data = ["data.dataset=nnunet", f"data.root={root}", *SMALL]
    pretrain = tmp_path / "runs" / "pretrain"
    stage1 = ["optim.iterations=2", "loss.strategy=GR", "model.g1_hidden=16"]
    assert main(["pretrain-global", "--out", str(pretrain), *data, *stage1]) == 0
    finetune = tmp_path / "runs" / "finetune"
    assert main(["finetune", "--out", str(finetune), *data, "optim.iterations=3",
                 "optim.batch_size=4", "finetune.init=encoder",
                 f"finetune.pretrained={pretrain}"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "no validation cases, so the last weights are kept" in printed
    bundle = json.loads((finetune / "model.json").read_text())
    assert bundle["provenance"]["train_cases"] == ["patient001"]

    out = tmp_path / "predictions"
    assert main(["predict", "-m", str(finetune), "-i", str(root / "imagesTs"), "-o", str(out)]) == 0
    for case in ("patient008", "patient009"):
        scan = nib.load(root / "imagesTs" / f"{case}_0000.nii.gz")
        labels = nib.load(out / f"{case}.nii.gz")
        assert labels.shape == scan.shape and np.allclose(labels.affine, scan.affine)
        assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 1, 2, 3}


def test_a_relative_root_works_from_any_directory(tmp_path, monkeypatch, capsys) -> None:
    root = _own_dataset(tmp_path)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    args = ["finetune", "--out", "run", "data.dataset=nnunet", f"data.root={root.name}", *SMALL,
            "optim.iterations=1", "optim.batch_size=2"]  # fmt: skip
    assert main(args) == 0
    saved = (run / "config.yaml").read_text()
    assert f"root: {root}" in saved
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["finetune", "--out", str(run), "--config", str(run / "config.yaml")]) == 0
    assert "done at iteration 1" in capsys.readouterr().out
