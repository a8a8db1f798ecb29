"""The trainer's loop and run directory on a toy stage (a linear model, no data set): damaged
checkpoints, torn logs, locking, TensorBoard events after a resume, deferred finiteness checks,
interrupts and the checkpoint schedule."""

from __future__ import annotations

import json
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from contraseg.config import OptimConfig
from contraseg.errors import InputError, TrainingError
from contraseg.training.checkpoint import load_checkpoint, load_weights
from contraseg.training.trainer import LOCK, MARKER, RunLock, Trainer


@dataclass
class ToyRun:
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(iterations=6, checkpoint_every=2, log_every=1)
    )
    seed: int = 0


class Toy(Trainer):
    """A stage that uses all three generators, so that resuming must restore each."""

    stage = "toy"

    def setup(self) -> None:
        self.model = nn.Linear(4, 2)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.05)
        self.data = torch.randn(16, 4)

    def compute_loss(self, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        index = torch.randint(0, 16, (4,), generator=self.sample_generator)
        x = self.data[index] + 0.1 * torch.randn(4, 4, generator=self.augment_generator)
        return (self.model(x) - 1).pow(2).mean(), {"chance": 1.0}


def toy(out: Path, **optim: int) -> Toy:
    defaults = {"iterations": 6, "checkpoint_every": 2, "log_every": 1}
    return Toy(ToyRun(optim=OptimConfig(**{**defaults, **optim})), out, device="cpu")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def interrupt_at(monkeypatch: pytest.MonkeyPatch, iteration: int) -> None:
    """A KeyboardInterrupt raised inside ``compute_loss`` (a hard stop, mid-iteration)."""
    original = Toy.compute_loss

    def compute_loss(self, it):
        if it == iteration:
            raise KeyboardInterrupt
        return original(self, it)

    monkeypatch.setattr(Toy, "compute_loss", compute_loss)


@pytest.fixture
def resumable(tmp_path, monkeypatch) -> Path:
    """A toy run stopped hard during iteration 6: checkpoint at 4, log lines 1..5."""
    with monkeypatch.context() as patch:
        interrupt_at(patch, 6)
        with pytest.raises(KeyboardInterrupt):
            toy(tmp_path / "run").run()
    return tmp_path / "run"


def test_a_run_writes_its_products_and_says_where(tmp_path, capsys):
    run_dir = toy(tmp_path / "run").run()
    assert (run_dir / MARKER).is_file() and not (run_dir / LOCK).exists()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] == 6
    assert [row["iteration"] for row in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    captured = capsys.readouterr()
    assert (
        captured.out.strip()
        == f"toy: done at iteration 6; weights in {run_dir}/weights.safetensors"
    )
    assert captured.err == ""  # no progress bar when stderr is not a terminal


def test_a_short_run_checkpoints_at_its_end(tmp_path):
    run_dir = toy(tmp_path / "run", iterations=3, checkpoint_every=500).run()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] == 3


# ---- damaged checkpoints ------------------------------------------------------------------


def _set(path: tuple, value):
    def damage(state):
        node = state
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return state

    return damage


def _drop(key: str):
    def damage(state):
        del state[key]
        return state

    return damage


def _model_tensor(value):
    return _set(("model", "weight"), value)


DAMAGES = {
    "empty file": (b"", "cannot load checkpoint"),
    "not a pickle": (b"garbage", "not written by torch.save"),
    "not a dict": (lambda s: [1, 2], "the checkpoint is list, expected dict"),
    "empty dict": (lambda s: {}, "lacks 'stage', 'iteration', 'model'"),
    "no optimizer": (_drop("optimizer"), "lacks 'optimizer'"),
    "no sampling rng": (_drop("rng_sample"), "lacks 'rng_sample'"),
    "unexpected entry": (_set(("surprise",), 1), "unexpected 'surprise'"),
    "model as a list": (_set(("model",), [1]), "model is list, expected dict"),
    "missing weight": (lambda s: (s["model"].pop("bias"), s)[1], "model lacks 'bias'"),
    "wrong shape": (_model_tensor(torch.zeros(3, 4)), "model.weight has shape (3, 4)"),
    "wrong dtype": (_model_tensor(torch.zeros(2, 4, dtype=torch.float64)), "float64"),
    "nan weight": (_model_tensor(torch.full((2, 4), float("nan"))), "model.weight holds NaN"),
    "huge iteration": (_set(("iteration",), 10**12), "iteration 1000000000000 is outside 0..6"),
    "negative iteration": (_set(("iteration",), -1), "iteration -1 is outside"),
    "iteration as float": (_set(("iteration",), 4.0), "iteration is float, expected int"),
    "other stage": (_set(("stage",), "finetune"), "a checkpoint of stage 'finetune', not 'toy'"),
    "torch rng garbage": (
        _set(("rng_torch",), torch.randint(0, 255, (1, 5056), dtype=torch.uint8)),
        "rng_torch does not restore",
    ),
    "torch rng short": (_set(("rng_augment",), torch.zeros(8, dtype=torch.uint8)), "shape (8,)"),
    "sampling rng garbage": (
        _set(("rng_sample",), torch.randint(0, 255, (5056,), dtype=torch.uint8)),
        "rng_sample does not restore",
    ),
    "augmentation rng of another world": (
        _set(("rng_augment",), torch.zeros(2, 5056, dtype=torch.uint8)),
        "rng_augment has shape (2, 5056), expected (1, 5056)",
    ),
    "other world size": (
        _set(("world_size",), 2),
        "written by a run of 2 processes and this run has 1; resume it with torchrun "
        "--nproc_per_node=2",
    ),
    "optimizer groups": (
        _set(("optimizer", "param_groups"), []),
        "optimizer state does not fit the model",
    ),
    "optimizer state shape": (
        _set(("optimizer", "state", 0, "exp_avg"), torch.zeros(5)),
        "optimizer.state.0.exp_avg has shape (5,)",
    ),
    "optimizer state of no parameter": (
        _set(("optimizer", "state", 7), {}),
        "entry 7 for no parameter",
    ),
}


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_checkpoint_is_refused_before_anything_changes(resumable, kind):
    damage, message = DAMAGES[kind]
    path = resumable / "checkpoints" / "last.pt"
    if isinstance(damage, bytes):
        path.write_bytes(damage)
    else:
        torch.save(damage(load_checkpoint(path)), path)
    before = files(resumable)
    trainer = toy(resumable)
    with pytest.raises(InputError, match=r"last\.pt") as err:
        trainer.run()
    assert message in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    assert files(resumable) == before
    assert trainer.iteration == 0


def test_a_finished_run_extended_and_shortened(tmp_path):
    run_dir = toy(tmp_path / "run").run()
    toy(run_dir, iterations=8).run()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] == 8
    with pytest.raises(InputError, match=r"iteration 8 is outside 0\.\.4"):
        toy(run_dir, iterations=4).run()


# ---- resume ---------------------------------------------------------------------------


def test_resume_after_a_hard_stop_matches_an_uninterrupted_run(tmp_path, resumable):
    assert load_checkpoint(resumable / "checkpoints" / "last.pt")["iteration"] == 4
    assert [row["iteration"] for row in metrics(resumable)] == [1, 2, 3, 4, 5]
    straight = toy(tmp_path / "straight").run()
    toy(resumable).run()
    assert metrics(resumable) == metrics(straight)
    a, b = (
        load_weights(straight / "weights.safetensors"),
        load_weights(resumable / "weights.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("torn", ['{"iteration": 6, "lo', '{"iteration": 6, "loss": 0.5}'])
def test_a_torn_last_log_line_does_not_block_resume(tmp_path, resumable, torn):
    """What a kill during the append leaves: a line without its newline (cut anywhere)."""
    with open(resumable / "metrics.jsonl", "a") as handle:
        handle.write(torn)
    toy(resumable).run()
    assert metrics(resumable) == metrics(toy(tmp_path / "straight").run())


def test_a_damaged_log_line_inside_the_file_is_refused(resumable):
    lines = (resumable / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (resumable / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = files(resumable)
    with pytest.raises(InputError, match=r"metrics.jsonl: line 2 is not a JSON record"):
        toy(resumable).run()
    assert files(resumable) == before


def _events(folder: Path) -> list[tuple[str, int, float]]:
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    return [
        (value.tag, event.step, value.simple_value)
        for path in sorted(folder.glob("*tfevents*"))
        for event in LegacyEventFileLoader(str(path)).Load()
        for value in event.summary.value
    ]


def test_tensorboard_shows_each_step_once_after_resumes(tmp_path, resumable, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with monkeypatch.context() as patch:  # a second hard stop, after a checkpoint at 6
        interrupt_at(patch, 8)
        with pytest.raises(KeyboardInterrupt):
            toy(resumable, iterations=10).run()
    toy(resumable, iterations=10).run()
    events = _events(resumable / "tensorboard")
    assert len(events) == len({(tag, step) for tag, step, _ in events})
    rows = metrics(resumable)
    accumulator = EventAccumulator(str(resumable / "tensorboard"))
    accumulator.Reload()
    shown = [(s.step, s.value) for s in accumulator.Scalars("toy/loss")]
    assert shown == [(row["iteration"], pytest.approx(row["loss"])) for row in rows]


def test_a_resume_without_checkpoint_starts_the_log_over(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            toy(tmp_path / "run", checkpoint_every=5).run()
    assert not (tmp_path / "run" / "checkpoints").exists()
    run_dir = toy(tmp_path / "run").run()
    steps = [step for tag, step, _ in _events(run_dir / "tensorboard") if tag == "toy/loss"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [row["iteration"] for row in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]


# ---- interrupts -----------------------------------------------------------------------


def test_a_hard_interrupt_says_where_the_run_resumes(capsys, resumable, monkeypatch):
    assert capsys.readouterr().err.strip() == (
        "toy: interrupted after iteration 5; the same command resumes from the checkpoint of "
        "iteration 4"
    )
    interrupt_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        toy(resumable.parent / "new").run()
    assert capsys.readouterr().err.strip() == (
        "toy: interrupted after iteration 0; no checkpoint was written, so the next run starts over"
    )


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals need the main thread"
)
def test_ctrl_c_finishes_the_iteration_and_checkpoints_it(tmp_path, monkeypatch, capsys):
    original = Toy.compute_loss

    def compute_loss(self, it):
        if it == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-iteration
        return original(self, it)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(Toy, "compute_loss", compute_loss)
            with pytest.raises(KeyboardInterrupt):
                toy(tmp_path / "run", checkpoint_every=500).run()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "after iteration 3; the same command resumes from the checkpoint of iteration 3" in (
        capsys.readouterr().err
    )
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"] == 3
    toy(tmp_path / "run").run()
    straight = toy(tmp_path / "straight").run()
    assert metrics(tmp_path / "run") == metrics(straight)


# ---- non-finite values ----------------------------------------------------------------


def _loss_nan_at(monkeypatch, iteration):
    original = Toy.compute_loss

    def compute_loss(self, it):
        loss, stats = original(self, it)
        return (loss * float("nan") if it == iteration else loss), stats

    monkeypatch.setattr(Toy, "compute_loss", compute_loss)


def test_a_nan_loss_found_at_the_next_log_names_its_iteration(tmp_path, monkeypatch):
    _loss_nan_at(monkeypatch, 5)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError) as err:
        toy(run_dir, iterations=10, checkpoint_every=4, log_every=4).run()
    assert "the loss became nan at iteration 5" in str(err.value)
    assert f"of iteration 4, is kept in {run_dir}/checkpoints/last.pt" in str(err.value)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["iteration"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert [row["iteration"] for row in metrics(run_dir)] == [1, 4]
    assert not (run_dir / "weights.safetensors").exists()
    assert not (run_dir / LOCK).exists()


def test_a_nan_before_the_first_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    _loss_nan_at(monkeypatch, 2)
    with pytest.raises(TrainingError, match="No checkpoint had been written"):
        toy(tmp_path / "run", checkpoint_every=4, log_every=4).run()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_weights_that_turn_infinite_under_a_finite_loss_are_never_checkpointed(
    tmp_path, monkeypatch
):
    original = Toy.compute_loss

    def compute_loss(self, it):
        result = original(self, it)
        if it == 4:
            with torch.no_grad():  # the bias is not saved for backward: the loss stays finite
                self.model.bias.fill_(float("inf"))
        return result

    monkeypatch.setattr(Toy, "compute_loss", compute_loss)
    with pytest.raises(TrainingError, match=r"\(model.bias\) became non-finite by iteration 4"):
        toy(tmp_path / "run", checkpoint_every=2, log_every=10).run()
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"] == 2


# ---- the run directory ----------------------------------------------------------------


def test_a_locked_run_directory_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = RunLock(run_dir)
    holder.acquire()
    try:
        with pytest.raises(InputError, match=rf"is in use by process {os.getpid()} on "):
            toy(run_dir).run()
    finally:
        holder.release()
    assert list(run_dir.iterdir()) == []
    toy(run_dir).run()


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path):
    """The lock is the OS's: a stale lock file, whatever it says, is no lock."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK).write_text('{"pid": 1, "host": "gone", "started": "then"}')
    toy(run_dir).run()
    assert not (run_dir / LOCK).exists()


def test_the_lock_survives_a_concurrent_release(tmp_path, monkeypatch):
    """A process that opened the lock file just before its holder removed it must not run
    beside a third process that locks a new file at that path."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = RunLock(run_dir)
    holder.acquire()
    real_open = os.open

    def open_then_holder_releases(*args, **kwargs):
        fd = real_open(*args, **kwargs)
        holder.release()  # between this open and the flock
        return fd

    late = RunLock(run_dir)
    with monkeypatch.context() as patch:
        patch.setattr(os, "open", open_then_holder_releases)
        late.acquire()
    try:
        with pytest.raises(InputError, match="is in use"):
            RunLock(run_dir).acquire()
    finally:
        late.release()


def test_a_setup_error_leaves_no_folder_and_no_lock(tmp_path, monkeypatch):
    def setup(self):
        raise InputError("data.root", "no such folder")

    monkeypatch.setattr(Toy, "setup", setup)
    with pytest.raises(InputError, match="no such folder"):
        toy(tmp_path / "a" / "b" / "run").run()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError):
        toy(tmp_path / "empty").run()
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_folder_that_is_not_a_run_directory_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    for fresh in (False, True):
        with pytest.raises(InputError, match="is not a contraseg run directory"):
            toy(tmp_path / "mine").run(fresh=fresh)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_fresh_deletes_only_what_a_run_writes(tmp_path):
    run_dir = toy(tmp_path / "run").run()
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "evaluation").mkdir()
    (run_dir / "evaluation" / "summary.csv").write_text("old")
    (run_dir / ".weights.safetensors.x1.tmp").write_text("leftover")
    toy(run_dir, iterations=2).run(fresh=True)
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert not (run_dir / "evaluation").exists()
    assert not (run_dir / ".weights.safetensors.x1.tmp").exists()
    assert [row["iteration"] for row in metrics(run_dir)] == [1, 2]
