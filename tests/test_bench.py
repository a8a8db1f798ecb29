"""The benchmarks run on the CPU at their smallest sizes: a GPU session's few minutes should
measure, not find a broken option. Nothing here times anything or writes BENCHMARKS.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    # kept: a GPU machine's PYTHONPATH may hold the wheels gpu.sh installed (nibabel, MONAI)
    paths = [str(ROOT / "src"), str(BENCH), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    return subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _rows(output: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.split("|")] for line in output.splitlines() if "|" in line
    ]


@pytest.mark.slow
def test_the_step_benchmarks_run_every_eager_variant() -> None:
    """bench_train (the per-step comparison and a timed run) and bench_profile, as gpu.sh
    calls them but tiny and on the CPU (the compiled variants would need a C++ compiler);
    without ``--write`` they leave BENCHMARKS.md alone."""
    before = (ROOT / "BENCHMARKS.md").read_text()
    variants = [
        "default", "no-compile", "fp32", "no-channels-last", "no-fused-adam", "host-pool",
        "cudnn-benchmark",
    ]  # fmt: skip
    steps = ("--sizes", "tiny", "--rounds", "1", "--steps", "2", "--warm-up", "1")
    train = _run(
        sys.executable, "bench/bench_train.py", "--device", "cpu", *steps,
        "--variants", *variants, "--run-iterations", "3", "--run-size", "tiny",
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-2000:]
    stages = ("pretrain-global", "pretrain-local", "finetune")
    rows = _rows(train.stdout)
    wanted = {(stage, variant) for stage in stages for variant in variants}
    assert {(row[0], row[3]) for row in rows if row[1] == "32 x 32"} == wanted  # steps
    assert {(row[0], row[1]) for row in rows if row[1] != "32 x 32"} == wanted  # timed runs
    profile = _run(
        sys.executable, "bench/bench_profile.py", "--device", "cpu", "--size", "tiny",
        "--warm-up", "1", "--steps", "2",
    )  # fmt: skip
    assert profile.returncode == 0, profile.stderr[-2000:]
    assert tuple(row[0] for row in _rows(profile.stdout)) == stages
    assert (ROOT / "BENCHMARKS.md").read_text() == before


def test_the_prediction_benchmark_runs() -> None:
    before = (ROOT / "BENCHMARKS.md").read_text()
    predict = _run(sys.executable, "bench/bench_predict.py", "--device", "cpu", "--repeats", "1")
    assert predict.returncode == 0, predict.stderr[-2000:]
    [row] = _rows(predict.stdout)
    assert row[1] == "10 x 192 x 192" and float(row[4]) > 0  # whole / network
    assert (ROOT / "BENCHMARKS.md").read_text() == before


def test_the_augmentation_benchmark_times_the_compiled_appliers(monkeypatch) -> None:
    """bench_augment's rows, its compiled column included (traced, not code-generated)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_augment

    rows = bench_augment.run(torch.device("cpu"), repeats=1, size=32, backend="aot_eager")
    assert [row[0].split()[0] for row in rows] == ["finetune_augment", "pretrain_view"]
    assert all(float(row[3]) > 0 for row in rows)  # the compiled ms


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script would run")
def test_gpu_script_says_in_one_line_what_it_lacks() -> None:
    unknown = _run("bash", "bench/gpu.sh", "nosuchstep")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [
        "bench/gpu.sh: no step 'nosuchstep'; the steps are: "
        "tests stages demo options kernels profile overhead"
    ]
    no_gpu = _run("env", f"PYTHON={sys.executable}", "bash", "bench/gpu.sh", "stages")
    assert no_gpu.returncode == 2
    assert no_gpu.stderr.strip().splitlines()[-1].endswith("sees no CUDA device")
