"""Training commands against hostile run directories: folders that are not ours, bad --out
paths, failed starts, a second process, damaged checkpoints, a NaN, Ctrl-C (docs/training.md,
"Run directories, resume and failures")."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from child_process import child_env

from contraseg.config import PretrainGlobalRun, PretrainLocalRun, save_config
from contraseg.training.checkpoint import load_checkpoint
from contraseg.training.stages import GlobalPretrainer
from contraseg.training.trainer import LOCK, MARKER, RUN_FILES, RUN_FOLDERS


def train(run_cli, config_file, out, *extra, codes=(2,)):
    return run_cli("pretrain-global", "--config", config_file, "--out", out, *extra, codes=codes)


def _default_sigint() -> None:
    """The child gets Python's Ctrl-C handler even if this process runs with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_run_prints_its_product_and_nothing_on_stderr(sandbox, run_cli, config_file):
    result = train(run_cli, config_file, sandbox.root / "run", codes=(0,))
    weights = sandbox.root / "run" / "weights.safetensors"
    assert result.out.strip().endswith(f"weights in {weights}")
    assert result.err == ""


@pytest.mark.parametrize("fresh", [(), ("--fresh",)])
def test_a_folder_that_is_not_a_run_directory_is_refused(sandbox, run_cli, config_file, fresh):
    (sandbox.root / "documents").mkdir()
    (sandbox.root / "documents" / "thesis.tex").write_text("years of work\n")
    check = sandbox.watch()
    result = train(run_cli, config_file, sandbox.root, *fresh)
    assert "is not a contraseg run directory" in result.err
    check()


def test_fresh_replaces_only_what_a_run_writes(sandbox, run_cli, config_file):
    run_dir = sandbox.root / "run"
    train(run_cli, config_file, run_dir, codes=(0,))
    (run_dir / "notes.txt").write_text("mine\n")
    written = [run_dir / name for name in (*RUN_FILES, *RUN_FOLDERS, MARKER)]
    check = sandbox.watch(written)
    train(run_cli, config_file, run_dir, "--fresh", codes=(0,))
    check()


def test_another_stage_in_the_run_directory_is_refused(sandbox, run_cli, config_file):
    run_dir = sandbox.root / "run"
    train(run_cli, config_file, run_dir, codes=(0,))
    check = sandbox.watch()
    result = run_cli("finetune", "--out", run_dir)
    assert "is not the config of a finetune run" in result.err
    check()


@pytest.mark.parametrize(
    "where", ["precious.txt", "precious.txt/run", "/proc/contraseg-run", "x" * 300]
)
def test_an_impossible_out_is_refused_before_anything_is_written(
    sandbox, run_cli, config_file, where
):
    check = sandbox.watch()
    train(run_cli, config_file, sandbox.root / where)
    check()


@pytest.mark.parametrize(
    ("command", "overrides"),
    [
        ("pretrain-global", ["optim.itrations=3"]),  # config error
        ("pretrain-global", ["data.root=/nonexistent/contraseg"]),  # setup error
        ("pretrain-local", ["encoder=/nonexistent/run"]),  # setup error
    ],
)
def test_a_failed_start_leaves_no_run_directory(
    sandbox, run_cli, tiny_config, tmp_path, command, overrides
):
    config_file = tmp_path / "tiny.yaml"
    run_class = PretrainLocalRun if command == "pretrain-local" else PretrainGlobalRun
    required = overrides if command == "pretrain-local" else []  # stage 2 needs an encoder
    save_config(tiny_config(run_class, *required), config_file)
    (sandbox.root / "empty").mkdir()
    check = sandbox.watch()
    for out in (sandbox.root / "new" / "run", sandbox.root / "empty"):
        run_cli(command, "--config", config_file, "--out", out, *overrides)
    check()


def test_a_second_process_on_a_run_directory_is_refused(sandbox, run_cli, config_file):
    run_dir = sandbox.root / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import pathlib, sys, time\n"
            "from contraseg.training.trainer import RunLock\n"
            "RunLock(pathlib.Path(sys.argv[1])).acquire()\n"
            "print('locked', flush=True)\n"
            "time.sleep(120)\n",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        check = sandbox.watch()
        result = train(run_cli, config_file, run_dir)
        assert f"is in use by process {holder.pid} on " in result.err
        check()
    finally:
        holder.kill()  # the OS frees the lock of a killed process
        holder.wait()
    assert (run_dir / LOCK).exists()  # left behind by the kill; it is not a lock any more
    train(run_cli, config_file, run_dir, codes=(0,))
    assert not (run_dir / LOCK).exists()


def _wrong_shape(path: Path) -> None:
    state = load_checkpoint(path)
    key = next(k for k, v in state["model"].items() if v.dim() == 4)
    state["model"][key] = state["model"][key][:1]
    torch.save(state, path)


DAMAGES = {
    "empty file": lambda path: path.write_bytes(b""),
    "empty dict": lambda path: torch.save({}, path),
    "wrong shape": _wrong_shape,
}


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_checkpoint_is_one_line_and_changes_nothing(sandbox, run_cli, config_file, kind):
    run_dir = sandbox.root / "run"
    train(run_cli, config_file, run_dir, codes=(0,))
    DAMAGES[kind](run_dir / "checkpoints" / "last.pt")
    check = sandbox.watch()
    result = train(run_cli, config_file, run_dir, "optim.iterations=3")
    assert "last.pt" in result.err
    check()


def test_a_nan_found_at_a_later_log_stops_with_status_1_and_a_finite_checkpoint(
    sandbox, run_cli, config_file, monkeypatch
):
    original = GlobalPretrainer.compute_loss

    def compute_loss(self, it):
        loss, stats = original(self, it)
        return (loss * float("nan") if it == 5 else loss), stats

    monkeypatch.setattr(GlobalPretrainer, "compute_loss", compute_loss)
    run_dir = sandbox.root / "run"
    settings = ("optim.iterations=6", "optim.checkpoint_every=4", "optim.log_every=3")
    result = train(run_cli, config_file, run_dir, *settings, codes=(1,))
    assert "the loss became nan at iteration 5" in result.err
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["iteration"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (run_dir / "weights.safetensors").exists()


def test_ctrl_c_checkpoints_and_says_from_where_the_command_resumes(config_file, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "contraseg.cli", "pretrain-global"]
    args = ["--config", str(config_file), "--out", str(run_dir), "optim.iterations=100000"]
    process = subprocess.Popen(
        [*command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        preexec_fn=_default_sigint,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    first, last = err.strip().splitlines()
    assert last == "contraseg: interrupted"
    match = re.fullmatch(
        r"pretrain-global: interrupted after iteration (\d+); "
        r"the same command resumes from the checkpoint of iteration (\d+)",
        first,
    )
    assert match and match[1] == match[2], first
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] == int(match[1])
