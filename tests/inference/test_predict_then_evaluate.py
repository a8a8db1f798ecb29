"""One inference path: a tiny fine-tuned model's predictions written by ``predict`` score exactly
what ``evaluate --run`` reports, and ``evaluate --pred --ref`` on those files agrees, with MONAI."""

from __future__ import annotations

import json
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, compute_hausdorff_distance
from monai.networks.utils import one_hot

from contraseg.cli import main
from contraseg.config import FinetuneRun
from contraseg.data.dataset import load_dataset
from contraseg.data.readers import get_reader
from contraseg.evaluation.evaluate import evaluate_folders, evaluate_run
from contraseg.inference import Segmenter, read_bundle
from contraseg.training.stages import run_finetune


@pytest.fixture(scope="module", params=["none", "otsu"])
def predicted(request, tmp_path_factory, tiny_config):
    """A fine-tuned run, its test images predicted by the command line, and their references
    named as ACDC names them (``{case}_gt.nii.gz``); normalised over the whole volume, or
    inside a foreground mask (which prediction must then apply too)."""
    work = tmp_path_factory.mktemp("predict")
    config = tiny_config(
        FinetuneRun,
        "optim.iterations=40",
        "optim.batch_size=8",
        "finetune.val_every=20",
        f"data.normalise_mask={request.param}",
        f"data.cache={work / 'cache'}",  # the shared tiny cache keeps its own settings
    )
    run_dir = run_finetune(config, work / "run")
    _, split = load_dataset(config.data)
    files = {c.case_id: c for c in get_reader(config.data).list_cases(config.data.root)}
    (work / "images").mkdir()
    (work / "refs").mkdir()
    for case_id in split.test:
        shutil.copy(files[case_id].image, work / "images")
        shutil.copy(files[case_id].label, work / "refs")
    argv = ["predict", "-m", run_dir, "-i", work / "images", "-o", work / "pred", "--device", "cpu"]
    assert main([str(a) for a in argv]) == 0
    return config, run_dir, split, work


def test_the_bundle_written_by_finetuning(predicted):
    config, run_dir, _, _ = predicted
    bundle = read_bundle(run_dir)
    reader = get_reader(config.data)
    assert bundle.label_values == reader.label_values == (0, 1, 2, 3)
    assert bundle.class_names == reader.class_names
    assert bundle.preprocessing.orientation == "as_stored"
    assert bundle.preprocessing.normalise_mask == config.data.normalise_mask
    assert len(bundle.preprocessing.foreground_fractions) == len(bundle.provenance.train_cases)
    assert bundle.preprocessing.size == (32, 32)
    assert bundle.absent_classes == "count_as_one"
    assert bundle.provenance.dataset == "phantom" and bundle.provenance.iterations == 40
    assert 0.0 <= bundle.provenance.best_val_dice <= 1.0


def test_predict_then_evaluate_equals_evaluate_run_and_monai(predicted):
    config, run_dir, split, work = predicted
    by_run = evaluate_run(run_dir, device="cpu")
    by_files = evaluate_folders(work / "pred", work / "refs", labels=run_dir)
    assert len(by_files.cases) == len(by_run.cases) == len(split.test)
    # the same volumes: case ids are patient folders, file stems name the frame too
    run_cases = {case.case_id: case for case in by_run.cases}
    for file_case in by_files.cases:
        run_case = run_cases[file_case.case_id.split("_frame")[0]]
        assert file_case.dice == run_case.dice
        np.testing.assert_allclose(file_case.hd95, run_case.hd95, rtol=1e-12)
    assert by_files.mean_dice == pytest.approx(by_run.mean_dice, abs=1e-12)  # other order

    # the label maps written by predict are the predictions evaluate --run scores
    prepared, _ = load_dataset(config.data)
    segmenter = Segmenter.from_pretrained(run_dir, device="cpu")
    for case_id in split.test:
        (written,) = (work / "pred").glob(f"{case_id}_*.nii.gz")
        labels = np.asarray(nib.load(written).dataobj)
        np.testing.assert_array_equal(labels, segmenter.predict_case(prepared.cases[case_id]))

    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    for case in by_files.cases:
        pred_img = nib.load(work / "pred" / f"{case.case_id}.nii.gz")
        ref_img = nib.load(work / "refs" / f"{case.case_id}_gt.nii.gz")
        pred, ref = (
            torch.from_numpy(np.rint(np.asarray(i.dataobj)).astype(np.int64))[None, None]
            for i in (pred_img, ref_img)
        )
        dice = metric(one_hot(pred, 4), one_hot(ref, 4))[0].numpy()
        np.testing.assert_allclose(case.dice, dice, rtol=1e-6)
        spacing = [float(s) for s in ref_img.header.get_zooms()[:3]]
        for label in range(1, 4):
            p, r = pred == label, ref == label
            if p.any() and r.any():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    hd = compute_hausdorff_distance(p, r, percentile=95, spacing=spacing)
                assert case.hd95[label - 1] == pytest.approx(float(hd), rel=1e-6)


def test_evaluate_command_on_folders(predicted, capsys):
    _, run_dir, split, work = predicted
    out = work / "scores"
    argv = ["evaluate", "--pred", work / "pred", "--ref", work / "refs", "--out", out]
    code = main([str(a) for a in argv])
    printed = capsys.readouterr().out
    assert code == 0 and "HD95 mm" in printed and f"tables in {out}" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == len(split.test)
    assert set(summary["classes"]) == {"1", "2", "3"}  # no --labels: named by value
    assert set(summary["classes"]["1"]) == {"dice", "hd95"}
    labelled = evaluate_folders(work / "pred", work / "refs", labels=run_dir)
    assert summary["mean_dice"] == pytest.approx(labelled.mean_dice, abs=1e-12)
    assert {p.name for p in out.iterdir()} == {"per_case.csv", "summary.csv", "summary.json"}
    assert main(["evaluate", "--pred", str(work / "pred"), "--ref", str(work / "refs")]) == 0
    assert (work / "pred" / "evaluation" / "summary.json").is_file()
