"""The main job on a tiny plan: runs end to end; the report shows the numbers of results.json."""

from __future__ import annotations

import json

import pytest

from contraseg.demo import INITS, DemoPlan, run_demo

TINY_PLAN = DemoPlan(
    volumes=20,
    phantom_size=48,
    widths=(4, 8, 8, 8, 8, 8),
    global_iterations=4,
    local_iterations=3,
    finetune_iterations=4,
    val_every=2,
    labelled_volumes=(1, 2),
    combinations=("c1",),
    volumes_per_batch=2,
    local_batch=4,
    finetune_batch=4,
    image_size=32,
)


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports_what_it_measured(tmp_path, capsys):
    rows = run_demo(tmp_path, device="cpu", plan=TINY_PLAN)
    out = capsys.readouterr().out

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(rows))
    assert len(saved) == len(INITS) * 2
    for row in saved:
        assert {
            "init",
            "labelled_volumes",
            "combination",
            "seed",
            "test_dice",
            "per_class_dice",
        } <= set(row)
        assert 0.0 <= row["test_dice"] <= 1.0
        assert (tmp_path / row["run"] / "evaluation" / "per_case.csv").is_file()

    report = (tmp_path / "report.md").read_text()
    for init in INITS:
        for n in (1, 2):
            (value,) = [
                r["test_dice"] for r in saved if r["init"] == init and r["labelled_volumes"] == n
            ]
            assert f"{value:.3f} +- 0.000 (n=1)" in report
            assert f"{value:.3f}" in out
    for figure in ("pretraining_loss", "validation_dice", "test_dice_vs_labelled", "test_overlays"):
        assert (tmp_path / "figures" / f"{figure}.png").stat().st_size > 1000
    assert (tmp_path / "pretrain-global-GD").is_dir()
    assert (tmp_path / "finetune-GD+LD-1vol-c1-s0").is_dir()
