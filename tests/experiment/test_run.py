"""Grids run end to end at tiny size: skip and resume, failures, workers, shards, results.

Nothing here asserts that pre-training wins: the numbers are whatever the tiny runs give.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from child_process import child_env
from scipy import stats as scipy_stats

from contraseg import demo
from contraseg.cli import main
from contraseg.experiment import execute, load_plan, run_experiment
from contraseg.experiment import run as run_module
from contraseg.experiment.plan import TIME_FILE
from contraseg.training.trainer import Speed

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
GRIDS = REPO / "configs" / "paper" / "grids"
# long enough for the initialisations to give different scores
LONGER = {"finetune": {"finetune": {"val_every": 5}, "optim": {"iterations": 15, "batch_size": 4}}}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, write_tiny_grid):
    """The tiny grid with 2 labelled sets x 2 seeds, run once for the tests that read it."""
    folder = tmp_path_factory.mktemp("grid")
    path = write_tiny_grid(folder, combinations=["c1", "c2"], seeds=[0, 1], **LONGER)
    result = run_experiment([path], folder / "out", device="cpu")
    assert result.outcome is not None and result.outcome.ok
    return result


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_results_csv_has_a_row_per_run_with_every_key(finished):
    plan = finished.plan
    rows = _csv_rows(plan.out / "results.csv")
    assert [r["run"] for r in rows] == [r.name for r in plan.level("finetune")]
    for row in rows:
        run_dir = plan.out / row["run"]
        summary = json.loads((run_dir / "evaluation" / "summary.json").read_text())
        model = json.loads((run_dir / "model.json").read_text())
        assert float(row["test_dice"]) == summary["mean_dice"]
        assert float(row["dice_LV"]) == summary["classes"]["LV"]["dice"]
        assert "hd95_mm_RV" in row and "pretrained" in row
        assert row["pretrain_global.loss.strategy"] in ("", "GR", "GD")
        assert int(row["iterations"]) == 15
        assert float(row["best_val_dice"]) == model["provenance"]["best_val_dice"]
        assert int(row["best_iteration"]) == model["provenance"]["best_iteration"]
        times = json.loads((run_dir / TIME_FILE).read_text())
        assert float(row["wall_s"]) == pytest.approx(sum(times.values()))
        assert set(times) == {"train_s", "evaluate_s"}


def _cell_text(values: list[float]) -> str:
    mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
    return f"{mean:.3f} ± {std:.3f} (n={len(values)})"


def test_table_and_comparisons_equal_a_hand_computation(finished):
    """Means, sample stds and paired statistics recomputed from results.csv by hand."""
    out = finished.plan.out
    rows = _csv_rows(out / "results.csv")
    table = (out / "table.md").read_text()
    scores: dict[tuple[str, str], dict[tuple[str, str], float]] = {}
    for row in rows:
        key = (row["init"], row["labelled_volumes"])
        scores.setdefault(key, {})[(row["combination"], row["seed"])] = float(row["test_dice"])
    for init in ("random", "G^R", "G^D", "G^D + L^D"):
        cells = [_cell_text(list(scores[init, n].values())) for n in ("1", "2")]
        assert f"| {init} | {cells[0]} | {cells[1]} |" in table
    for init in ("G^R", "G^D", "G^D + L^D"):
        for n in ("1", "2"):
            pairs = scores[init, n]
            differences = np.array([pairs[k] - scores["random", n][k] for k in sorted(pairs)])
            assert len(differences) == 4
            mean = differences.mean()
            line = next(
                ln for ln in table.splitlines() if ln.startswith(f"| {init} - random | {n} |")
            )
            assert f"| 4 | {mean:+.3f} |" in line
            if np.any(differences != 0):
                p = scipy_stats.wilcoxon(differences).pvalue
                shown = "< 0.001" if p < 0.001 else f"{p:.3g}"
                assert f"| {shown} |" in line
            # the bootstrap interval brackets the mean difference
            low, high = map(float, re.findall(r"[+-]\d\.\d{3}", line.split("|")[5]))
            assert low - 1e-3 <= mean <= high + 1e-3


def test_the_report_is_one_self_contained_page(finished):
    out = finished.plan.out
    page = (out / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) >= 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page and 'href="http' not in page
    for heading in (
        "Results",
        "Test Dice against labelled volumes",
        "Dice per structure",
        "Validation curves",
        "Pre-training losses",
        "Predictions",
        "Global embeddings",
        "Runs",
        "Settings",
    ):
        assert f"<h2>{heading}</h2>" in page
    assert "stand-in for ACDC" in page
    assert page.count("random with 1 labelled volume") == 3  # a verdict per initialisation
    for figure in ("dice_vs_labelled", "embeddings_GD", "embeddings_GR", "test_overlays"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 1000
    assert "![" in (out / "report.md").read_text()


def test_a_second_call_skips_everything_and_keeps_the_times(finished, capsys):
    plan = finished.plan
    before = {r.name: (plan.out / r.name / TIME_FILE).read_text() for r in plan.runs}
    again = run_experiment([plan.out / "grid.yaml"], plan.out, device="cpu")
    assert again.outcome is not None
    assert again.outcome.done == [] and len(again.outcome.finished) == len(plan.runs)
    assert before == {r.name: (plan.out / r.name / TIME_FILE).read_text() for r in plan.runs}
    assert again.rows == finished.rows


def test_an_interrupted_paper_grid_continues_where_it_stopped(tmp_path, monkeypatch):
    """Table 5 on Prostate with the tiny override, stopped by Ctrl-C during the third
    evaluation: the second call trains nothing that was trained and evaluates only what
    was not."""
    files = [GRIDS / "prostate.yaml", GRIDS / "table5_region.yaml", GRIDS / "tiny.yaml"]
    small = ["phantom.volumes=24", "data.size=[64,64]", "data.target_spacing=[2.0,2.0]"]
    out = tmp_path / "out"
    evaluated: list[str] = []
    trained: list[str] = []
    real_evaluate = execute.evaluate_run

    def evaluate(run_dir, device="auto"):
        evaluated.append(Path(run_dir).relative_to(out).as_posix())
        if len(evaluated) == 3 and not trained_once:
            raise KeyboardInterrupt
        return real_evaluate(run_dir, device=device)

    def counting(stage):
        real = execute.RUNNERS[stage]

        def run(config, run_dir, device="auto", speed=None):
            trained.append(Path(run_dir).relative_to(out).as_posix())
            return real(config, run_dir, device=device, speed=speed)

        return run

    monkeypatch.setattr(execute, "evaluate_run", evaluate)
    monkeypatch.setattr(execute, "RUNNERS", {stage: counting(stage) for stage in execute.RUNNERS})
    trained_once = False
    with pytest.raises(KeyboardInterrupt):
        run_experiment(files, out, small, device="cpu")
    first_trained, first_evaluated = list(trained), list(evaluated)
    assert len(first_evaluated) == 3
    weights = {
        name: (out / name / "weights.safetensors").stat().st_mtime_ns for name in first_trained
    }
    trained.clear()
    evaluated.clear()
    trained_once = True
    result = run_experiment(files, out, small, device="cpu")
    assert result.outcome is not None and result.outcome.ok
    plan = result.plan
    every = [r.name for r in plan.runs]
    assert sorted(first_trained + trained) == sorted(every)  # each run trained exactly once
    finetuning = [r.name for r in plan.level("finetune")]
    assert evaluated == [first_evaluated[-1], *finetuning[len(first_evaluated) :]]
    assert weights == {
        name: (out / name / "weights.safetensors").stat().st_mtime_ns for name in first_trained
    }
    assert len(result.rows) == len(finetuning) == 4 * 2
    assert {r.name for r in plan.runs if r.stage != "finetune"} == {
        "pretrain-global/GD",
        "pretrain-local/GD+LD-d3-K1",
        "pretrain-local/GD+LD-d3-K3",
    }


def test_a_failed_pretraining_stops_only_what_needs_it(tiny_grid, tmp_path, capsys):
    inits = [
        {"name": "random"},
        {"name": "G^D", "pretrain_global": {}},
        {"name": "too big", "pretrain_global": {"loss": {"volumes_per_batch": 50}}},
        {
            "name": "too big + L^D",
            "pretrain_global": {"loss": {"volumes_per_batch": 50}},
            "pretrain_local": {},
        },
    ]
    path = tiny_grid(initialisations=inits, labelled_volumes=[1])
    out = tmp_path / "out"
    assert main(["experiment", "--config", str(path), "--out", str(out), "--device", "cpu"]) == 1
    printed = capsys.readouterr().out
    assert re.search(r"FAILED pretrain-global/GD-m50: .*volumes_per_batch", printed)
    blocked = [
        "pretrain-local/GD-m50+LD",
        "finetune/GD-m50/1vol-c1-s0",
        "finetune/GD-m50+LD/1vol-c1-s0",
    ]
    for name in blocked:
        assert f"not started: {name}: needs " in printed
        assert not (out / name).exists()
    assert (
        "not starting finetune/GD-m50/1vol-c1-s0: needs pretrain-global/GD-m50, which failed"
        in printed
    )
    for name in ("finetune/random/1vol-c1-s0", "finetune/GD/1vol-c1-s0"):
        assert (out / name / "evaluation" / "summary.json").is_file()
    assert (out / ".experiment" / "failed" / "pretrain-global__GD-m50.txt").is_file()


def test_a_level_whose_dependencies_are_not_done_starts_only_the_free_runs(
    tiny_grid, tmp_path, capsys
):
    path = tiny_grid(labelled_volumes=[1])
    out = tmp_path / "out"
    code = main(["experiment", "--config", str(path), "--out", str(out), "--level", "finetune"])
    assert code == 1
    printed = capsys.readouterr().out
    assert "needs pretrain-global/GD, which is not finished: run its level first" in printed
    assert (out / "finetune/random/1vol-c1-s0/evaluation/summary.json").is_file()
    assert not (out / "pretrain-global").exists()


def test_dry_run_lists_the_runs_and_estimates_without_running(tiny_grid, tmp_path, capsys):
    path = tiny_grid()
    out = tmp_path / "out"
    assert main(["experiment", "--config", str(path), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    for name in ("pretrain-global/GR", "pretrain-local/GD+LD", "finetune/GD+LD/2vol-c1-s0"):
        assert re.search(rf"{re.escape(name)}\s+new", printed)
    assert "needs pretrain-global/GD" in printed
    assert re.search(r"pretrain-global/GD\s+\d+\.\d+ s/iteration", printed)
    assert re.search(r"finetune\s+\d+\.\d+ s/iteration, one validation", printed)
    assert "total:" in printed and "estimate" in printed


def test_workers_on_two_devices_finish_the_grid(tiny_grid, tmp_path, capsys, monkeypatch):
    """One worker process per device; a worker starts python afresh, so the grid is small."""
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    inits = [{"name": "random"}, {"name": "G^D", "pretrain_global": {}}]
    path = tiny_grid(initialisations=inits, labelled_volumes=[1])
    out = tmp_path / "out"
    command = ["experiment", "--config", str(path), "--out", str(out), "--devices", "cpu,cpu"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    names = ["pretrain-global/GD", "finetune/random/1vol-c1-s0", "finetune/GD/1vol-c1-s0"]
    assert sorted(re.findall(r"^done (\S+)", printed, re.M)) == sorted(names)
    # the first two have no dependency between them: they ran side by side
    assert printed.index("[2/3] finetune/random") < printed.index("done pretrain-global/GD")
    for name in names:
        log = (out / "logs" / f"{name.replace('/', '__')}.log").read_text()
        assert f"weights in {out / name}" in log
    assert (out / "finetune/GD/1vol-c1-s0/evaluation/summary.json").is_file()
    assert (out / "report.html").is_file()


def test_two_shards_together_do_every_run_exactly_once(tiny_grid, tmp_path):
    """Shard 1 starts first and waits for the pre-training that shard 0 does (each level's
    first run); together they do every run once."""
    inits = [
        {"name": "random"},
        {"name": "G^D", "pretrain_global": {}},
        {"name": "G^D + L^D", "pretrain_global": {}, "pretrain_local": {}},
    ]
    path = tiny_grid(initialisations=inits, combinations=["c1", "c2"], labelled_volumes=[1])
    out = tmp_path / "out"
    # prepared before the shards start, so that neither waits for the other to prepare it
    every = {r.name for r in load_plan([path], out, claim=False)[0].runs}
    command = [sys.executable, "-m", "contraseg.cli", "experiment", "--config", str(path)]
    command += ["--out", str(out), "--device", "cpu"]

    def start(index: int) -> subprocess.Popen:
        return subprocess.Popen(
            [*command, "--shard", f"{index}/2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=child_env(PYTHONUNBUFFERED="1"),
        )

    second = start(1)
    early = []
    assert second.stdout is not None
    for line in second.stdout:
        early.append(line)
        if line.startswith("waiting for"):
            break
    assert early[-1].startswith("waiting for pretrain-"), "".join(early)
    first = start(0)
    outputs = [
        first.communicate(timeout=600)[0],
        "".join(early) + second.communicate(timeout=600)[0],
    ]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    started = [re.findall(r"^\[\d+/\d+\] (\S+) \(new", text, re.M) for text in outputs]
    assert started[0][:2] == ["pretrain-global/GD", "pretrain-local/GD+LD"] and started[1]
    assert not set(started[0]) & set(started[1])
    assert sorted(started[0] + started[1]) == sorted(every)
    for name in every:
        assert (out / name / "weights.safetensors").is_file()
    assert math.isfinite(float(_csv_rows(out / "results.csv")[0]["test_dice"]))


def test_a_shard_does_not_start_what_needs_another_shards_failed_run(tiny_grid, tmp_path, capsys):
    inits = [{"name": "random"}, {"name": "G^D", "pretrain_global": {}}]
    path = tiny_grid(initialisations=inits, combinations=["c1", "c2"], labelled_volumes=[1])
    out = tmp_path / "out"
    failed = out / ".experiment" / "failed" / "pretrain-global__GD.txt"
    failed.parent.mkdir(parents=True)
    (out / ".contraseg-experiment").write_text("")
    failed.write_text("the loss became nan at iteration 2\n")  # what shard 0 recorded
    result = run_experiment([path], out, device="cpu", shard="1/2")
    assert result.outcome is not None
    why = "needs pretrain-global/GD, which failed: the loss became nan at iteration 2"
    # the shard's runs: every second fine-tuning run, here those of G^D
    assert result.outcome.blocked == {f"finetune/GD/1vol-{c}-s0": why for c in ("c1", "c2")}
    assert result.outcome.done == [] and not (out / "pretrain-global").exists()
    assert f"not started: finetune/GD/1vol-c2-s0: {why}" in capsys.readouterr().out


def test_joint_pretext_mixup_and_self_training_initialisations_run_and_pair(tiny_grid, tmp_path):
    """One initialisation of each new kind beside random: each fine-tuning run has its row,
    each initialisation its paired comparison with random; a second call skips them all."""
    inits = [
        {"name": "random"},
        {"name": "joint", "pretrain_joint": {"lambda_local": 10}},
        {
            "name": "rotation",
            "pretrain_pretext": {"pretext": {"task": "rotation"}},
            "load": "encoder",
        },
        {"name": "random + Mixup", "finetune": {"finetune": {"mixup_alpha": 0.2}}},
        {"name": "random + self-training", "finetune": {"finetune": {"self_training_rounds": 1}}},
    ]
    path = tiny_grid(
        initialisations=inits,
        labelled_volumes=[1],
        combinations=["c1", "c2"],
        pretrain_joint={
            "global_loss": {"volumes_per_batch": 2},
            "local_loss": {"strategy": "LD", "volumes_per_batch": 2},
            "optim": {"iterations": 3},
        },
        pretrain_pretext={"optim": {"iterations": 3, "batch_size": 4}},
    )
    out = tmp_path / "out"
    result = run_experiment([path], out, device="cpu")
    assert result.outcome is not None and result.outcome.ok
    rows = _csv_rows(out / "results.csv")
    assert [(r["init"], r["combination"]) for r in rows] == [
        (i["name"], c) for c in ("c1", "c2") for i in inits
    ]
    by_init = {r["init"]: r for r in rows}
    assert by_init["joint"]["pretrained"] == "pretrain-joint/GD+LD-lambda10"
    assert by_init["joint"]["finetune.finetune.init"] == "encoder+decoder"
    assert by_init["rotation"]["pretrain_pretext.pretext.task"] == "rotation"
    assert by_init["rotation"]["finetune.finetune.init"] == "encoder"
    assert by_init["random + Mixup"]["finetune.finetune.mixup_alpha"] == "0.2"
    assert by_init["random + self-training"]["run"] == "finetune/random+self1/1vol-c2-s0"
    table = (out / "table.md").read_text()
    for init in ("joint", "rotation", "random + Mixup", "random + self-training"):
        assert re.search(rf"^\| {re.escape(init)} - random \| 1 \| 2 \| [+-]\d", table, re.M)
    # self-training: its rounds, and the last one's bundle in the run folder
    run_dir = out / "finetune/random+self1/1vol-c1-s0"
    assert (run_dir / "round-0/weights.safetensors").is_file()
    assert json.loads((run_dir / "model.json").read_text()) == json.loads(
        (run_dir / "round-1/model.json").read_text()
    )
    assert (out / "report.html").is_file()
    again = run_experiment([path], out, device="cpu")
    assert again.outcome is not None and again.outcome.done == []
    assert len(again.outcome.finished) == len(result.plan.runs)


def test_no_compile_reaches_every_run(tiny_grid, tmp_path, monkeypatch):
    """``--no-compile`` of ``contraseg experiment`` and ``contraseg demo``: runs trained in this
    process get it, and so do worker processes (on their command line)."""
    speeds = []

    def record(stage):
        def run(config, run_dir, device="auto", speed=None):
            speeds.append(speed)

        return run

    monkeypatch.setattr(execute, "RUNNERS", {stage: record(stage) for stage in execute.RUNNERS})
    monkeypatch.setattr(execute, "evaluate_run", lambda *args, **kwargs: None)
    path = tiny_grid(initialisations=[{"name": "random"}], labelled_volumes=[1])
    main(["experiment", "--config", str(path), "--out", str(tmp_path / "out"), "--no-compile"])
    assert speeds == [Speed(compile=False)]
    worker = run_module._worker_command([path], tmp_path / "out", [], no_compile=True)
    assert "--no-compile" in worker("finetune/random/1vol-c1-s0", "cpu")
    assert "--no-compile" not in run_module._worker_command([path], tmp_path, [], False)("x", "cpu")
    seen = {}

    def fake_experiment(*args, **kwargs):
        seen.update(kwargs)
        return SimpleNamespace(outcome=None)

    monkeypatch.setattr(demo, "run_experiment", fake_experiment)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-compile"]) == 0
    assert seen["no_compile"] is True
