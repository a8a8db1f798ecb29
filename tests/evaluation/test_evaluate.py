"""`evaluate` on a tiny fine-tuned run: the paper's score on the native grid, CSV outputs."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from contraseg.cli import main
from contraseg.config import FinetuneRun
from contraseg.data.dataset import load_dataset
from contraseg.evaluation.evaluate import evaluate_run
from contraseg.inference import Segmenter
from contraseg.training.stages import run_finetune


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_config):
    config = tiny_config(
        FinetuneRun, "optim.iterations=6", "optim.batch_size=4", "finetune.val_every=3"
    )
    return config, run_finetune(config, tmp_path_factory.mktemp("ft") / "run")


def test_evaluation_equals_monai_dice_on_the_native_grid(finetuned):
    config, run_dir = finetuned
    summary = evaluate_run(run_dir, device="cpu")

    prepared, split = load_dataset(config.data)
    segmenter = Segmenter.from_pretrained(run_dir, device="cpu")
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    per_volume = []
    for case_id in split.test:
        case = prepared.cases[case_id]
        pred = segmenter.predict_case(case)
        assert pred.shape == case.native_label.shape == tuple(case.grid.native_shape)
        as_onehot = [
            one_hot(torch.from_numpy(np.asarray(a, dtype=np.int64))[None, None], 4)
            for a in (pred, case.native_label)
        ]
        per_volume.append(metric(*as_onehot)[0].numpy())
    expected = float(np.mean([v.mean() for v in per_volume]))
    assert summary.mean_dice == pytest.approx(expected, abs=1e-6)
    assert len(summary.cases) == len(split.test)

    with open(run_dir / "evaluation" / "per_case.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["case"] for r in rows] == list(split.test)
    assert float(rows[0]["mean_dice"]) == pytest.approx(float(np.mean(per_volume[0])), abs=1e-6)
    assert (run_dir / "evaluation" / "summary.csv").is_file()


def test_evaluate_command_prints_the_table(finetuned, capsys):
    _, run_dir = finetuned
    assert main(["evaluate", "--run", str(run_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "HD95 mm" in out and "mean" in out


def test_evaluate_on_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_evaluate_refuses_a_pretraining_run(tiny_config, tmp_path, capsys):
    from contraseg.config import PretrainGlobalRun
    from contraseg.training.stages import run_pretrain_global

    config = tiny_config(PretrainGlobalRun, "optim.iterations=1", "loss.volumes_per_batch=2")
    run_dir = run_pretrain_global(config, tmp_path / "global")
    assert main(["evaluate", "--run", str(run_dir)]) == 2
    assert "not a finished `contraseg finetune` run" in capsys.readouterr().err
