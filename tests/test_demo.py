"""The demo on tiny sizes: its grid runs end to end through the experiment code, and what it
prints and reports is what results.csv holds (whatever that shows)."""

from __future__ import annotations

import csv

import pytest

from contraseg.demo import demo_grid, run_demo
from contraseg.experiment import load_grid

# the demo grid at tiny sizes: every initialisation at 1 and 2 labelled volumes, one pair
TINY = [
    "phantom.volumes=20",
    "phantom.size=48",
    "data.size=[32,32]",
    "data.target_spacing=[3.0,3.0]",
    "model.widths=[4,8,8,8,8,8]",
    "pretrain_global.optim.iterations=3",
    "pretrain_local.optim.iterations=3",
    "finetune.optim.iterations=4",
    "finetune.finetune.val_every=2",
    "combinations=[c1]",
    "seeds=[0]",
]


@pytest.mark.slow
def test_demo_runs_its_grid_end_to_end_and_reports_what_it_measured(tmp_path, capsys):
    result = run_demo(tmp_path, device="cpu", overrides=TINY)
    printed = capsys.readouterr().out
    assert result.outcome is not None and result.outcome.ok

    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * 2
    assert {r["init"] for r in rows} == {"random", "G^R", "G^D", "G^D + L^D"}
    for row in rows:
        assert 0.0 <= float(row["test_dice"]) <= 1.0
        assert (tmp_path / row["run"] / "evaluation" / "per_case.csv").is_file()
    table = (tmp_path / "table.md").read_text()
    first = next(line for line in table.splitlines() if line.startswith("| random |"))
    assert first in printed  # the printed table is the written one
    for init in ("G^R", "G^D", "G^D + L^D"):
        for n in ("1 labelled volume", "2 labelled volumes"):
            assert f"{init} vs random with {n}: too few pairs to compare (1 pair" in printed
    page = (tmp_path / "report.html").read_text()
    assert "stand-in for ACDC" in page and "G^D + L^D vs random" in page
    assert (tmp_path / "pretrain-global" / "GR").is_dir()
    assert (tmp_path / "finetune" / "GD+LD" / "2vol-c1-s0" / "model.json").is_file()


@pytest.mark.parametrize("quick", [False, True])
def test_the_demo_grids_load(quick):
    grid = load_grid([demo_grid(quick)])
    assert grid.data.dataset == "phantom" and grid.phantom is not None
