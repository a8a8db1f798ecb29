"""Running a plan: in this process, or one run per device in worker processes, or a shard of it.

A run starts when the runs it needs are finished. A finished run is skipped; an interrupted one
resumes (the trainer does it when the same run is started on the same folder); a run that
fails is recorded, the runs that need it are not started, and the others go on. Shards of one
grid on a shared file system see each other's finished runs and recorded failures through the
output folder (docs/experiments.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from contraseg import fileio
from contraseg.errors import InputError, TrainingError
from contraseg.evaluation.evaluate import evaluate_run
from contraseg.experiment.plan import LEVELS, TIME_FILE, Plan, Run, run_state
from contraseg.inference.device import resolve_device
from contraseg.training.joint import run_pretrain_joint
from contraseg.training.pretext import run_pretrain_pretext
from contraseg.training.stages import run_finetune, run_pretrain_global, run_pretrain_local
from contraseg.training.trainer import MARKER, Speed, compile_by_default

__all__ = [
    "Outcome",
    "Slot",
    "compile_choices",
    "execute_run",
    "parse_devices",
    "parse_shard",
    "recorded_seconds",
    "run_plan",
    "shard_runs",
]

RUNNERS = {
    "pretrain-global": run_pretrain_global,
    "pretrain-joint": run_pretrain_joint,
    "pretrain-pretext": run_pretrain_pretext,
    "pretrain-local": run_pretrain_local,
    "finetune": run_finetune,  # one fine-tune, or self-training's rounds
}
STATE_DIR = ".experiment"
FAILED_DIR = f"{STATE_DIR}/failed"
LOG_DIR = "logs"
POLL_S = 1.0
STOP_GRACE_S = 120.0  # how long interrupted workers get to write their checkpoint


@dataclass
class Outcome:
    """What one invocation did with its runs."""

    done: list[str] = field(default_factory=list)  # trained and/or evaluated now
    finished: list[str] = field(default_factory=list)  # finished before: skipped
    failed: dict[str, str] = field(default_factory=dict)  # run -> the error
    blocked: dict[str, str] = field(default_factory=dict)  # run -> why it was not started

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked

    def summary(self) -> str:
        parts = [f"{len(self.done)} run(s) done now", f"{len(self.finished)} finished before"]
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        if self.blocked:
            parts.append(f"{len(self.blocked)} not started")
        return ", ".join(parts)


@dataclass(frozen=True)
class Slot:
    """Where a worker runs: the ``--device`` it is given and its environment."""

    device: str
    env: tuple[tuple[str, str], ...] = ()


def parse_devices(text: str) -> list[Slot]:
    """``0,1,2,3`` (GPU indices: one worker per GPU, each seeing only its own) or ``cpu,cpu``
    (CPU workers, the cores shared out between them)."""
    items = [item.strip() for item in text.split(",")]
    if not all(item == "cpu" or item.isdigit() for item in items):
        raise InputError("--devices", f"expected GPU indices or 'cpu', comma-separated: {text!r}")
    cpus = items.count("cpu")
    threads = str(max(1, (os.cpu_count() or 1) // max(cpus, 1)))
    slots = []
    for item in items:
        if item == "cpu":
            env = () if "OMP_NUM_THREADS" in os.environ else (("OMP_NUM_THREADS", threads),)
            slots.append(Slot("cpu", env))
        else:
            slots.append(Slot("cuda", (("CUDA_VISIBLE_DEVICES", item),)))
    return slots


def parse_shard(text: str) -> tuple[int, int]:
    """``i/n`` -> (i, n) with 0 <= i < n."""
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise InputError("--shard", f"expected i/n with 0 <= i < n, got {text!r}")
    return int(index), int(count)


def shard_runs(plan: Plan, shard: tuple[int, int] | None, level: str | None) -> list[Run]:
    """The runs of one shard: every n-th run of each level (in plan order), from offset i."""
    index, count = shard or (0, 1)
    chosen = []
    for stage in LEVELS:
        if level is None or stage == level:
            chosen += plan.level(stage)[index::count]
    return chosen


def _file_stem(name: str) -> str:
    return name.replace("/", "__")


def _failure_path(out: Path, name: str) -> Path:
    return out / FAILED_DIR / f"{_file_stem(name)}.txt"


def log_path(out: Path, name: str) -> Path:
    return out / LOG_DIR / f"{_file_stem(name)}.log"


# ---------------------------------------------------------------------------------------------
# One run, in this process


def recorded_seconds(run_dir: Path) -> float | None:
    """Training plus evaluation time of a run, summed over its resumptions; None if unknown."""
    try:
        times = json.loads((run_dir / TIME_FILE).read_text())
        return float(sum(times.values()))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


@contextlib.contextmanager
def _timed(run_dir: Path, key: str) -> Iterator[None]:
    """Add the time spent inside to ``key`` of the run's time file, interrupted or not (once
    the trainer has made the folder a run directory)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        if (run_dir / MARKER).is_file():
            path = run_dir / TIME_FILE
            try:
                times = json.loads(path.read_text())
            except (OSError, ValueError):
                times = {}
            times[key] = float(times.get(key, 0.0)) + time.perf_counter() - started
            fileio.write_json(path, times)


def execute_run(run: Run, out: Path, device: str, speed: Speed | None = None) -> None:
    """Train (or resume) ``run`` unless it is trained, then evaluate a fine-tuning run."""
    run_dir = out / run.name
    state = run_state(run, out)
    if state == "finished":
        return
    if state != "trained":
        with _timed(run_dir, "train_s"):
            RUNNERS[run.stage](run.config, run_dir, device=device, speed=speed)
    if run.stage == "finetune":
        with _timed(run_dir, "evaluate_s"):
            evaluate_run(run_dir, device=device)


def _network_shapes(run: Run) -> str:
    """What fixes the graphs a run compiles: the stage, the dataset (channels, classes), the
    image size, the network and the batch, and the loss and augmentation sections (whole,
    though only some of their options are constants of the graphs)."""
    config = run.config
    sections = (getattr(config, "loss", None), getattr(config, "augment", None))
    batch = (config.optim.batch_size, sections)
    return repr((run.stage, config.data.dataset, config.data.size, config.model, batch))


def compile_choices(
    runs: Sequence[Run], device: torch.device, no_compile: bool = False
) -> dict[str, Speed]:
    """How each of ``runs``, trained one after another in one process, uses torch.compile.

    A process compiles a network once per set of shapes: a later run of the same stage and
    shapes reuses the compiled graphs (dynamo guards on the parameters' shapes, not on which
    tensors they are; tests/training/test_stages.py checks it). So the iterations that must
    repay a compilation (``compile_by_default``) are counted over the runs that share their
    shapes, not run by run: the demo's 48 fine-tunings of 200 iterations compile once on a GPU,
    where each alone would stay eager. ``no_compile`` (``--no-compile``) compiles none.
    """
    if no_compile:
        return {run.name: Speed(compile=False) for run in runs}
    totals: Counter[str] = Counter()
    for run in runs:
        totals[_network_shapes(run)] += run.iterations
    return {
        run.name: Speed(compile=compile_by_default(device, totals[_network_shapes(run)]))
        for run in runs
    }


def _result_note(run: Run, out: Path) -> str:
    seconds = recorded_seconds(out / run.name)
    note = "" if seconds is None else f" in {seconds:.1f} s"
    summary = out / run.name / "evaluation" / "summary.json"
    if run.stage == "finetune" and summary.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            note += f", test Dice {json.loads(summary.read_text())['mean_dice']:.3f}"
    return note


# ---------------------------------------------------------------------------------------------
# The scheduler


@dataclass
class _Worker:
    run: Run
    slot: Slot
    process: subprocess.Popen
    log: IO[str]


class _Scheduler:
    def __init__(
        self,
        plan: Plan,
        runs: Sequence[Run],
        device: str,
        slots: Sequence[Slot] | None,
        worker_command: Callable[[str, str], list[str]] | None,
        wait: bool,
        wait_timeout: float,
        say: Callable[[str], None],
        no_compile: bool,
    ) -> None:
        self.plan, self.out = plan, plan.out
        self.device, self.slots = device, list(slots or [])
        self.worker_command = worker_command
        self.wait, self.wait_timeout, self.say = wait, wait_timeout, say
        self.outcome = Outcome()
        self.status: dict[str, str] = {}  # our runs: finished, done, failed, blocked
        self.todo: list[Run] = []
        for run in runs:
            if run_state(run, self.out) == "finished":
                self.status[run.name] = "finished"
                self.outcome.finished.append(run.name)
            else:
                self.todo.append(run)
        self.total = len(self.todo)
        # a worker is a process of its own, which decides for its one run
        self.speeds = (
            {} if self.slots else compile_choices(self.todo, resolve_device(device), no_compile)
        )
        self.started = 0
        self.running: dict[str, _Worker] = {}
        self.free = list(self.slots)
        self.waiting_since: dict[str, float] = {}
        self._external: dict[str, str] = {}  # per pass: dependency -> ok / failed:... / wait

    # -- dependencies -----------------------------------------------------------------------

    def _external_state(self, name: str) -> str:
        if name not in self._external:
            failure = _failure_path(self.out, name)
            if run_state(self.plan.run(name), self.out) == "finished":
                self._external[name] = "ok"
            elif failure.is_file():
                self._external[name] = "failed:" + failure.read_text().strip()
            else:
                self._external[name] = "wait"
        return self._external[name]

    def _readiness(self, run: Run) -> tuple[str, str]:
        """("ready", ""), ("wait", dependency) or ("blocked", why)."""
        waiting = ""
        for need in run.needs:
            state = self.status.get(need)
            if state in ("finished", "done"):
                continue
            if state == "failed":
                return "blocked", f"needs {need}, which failed"
            if state == "blocked":
                return "blocked", f"needs {need}, which was not started"
            if need in self.running or any(r.name == need for r in self.todo):
                waiting = waiting or need
                continue
            external = self._external_state(need)
            if external.startswith("failed:"):
                return "blocked", f"needs {need}, which failed: {external[7:]}"
            if external == "wait":
                if not self.wait:
                    return "blocked", f"needs {need}, which is not finished: run its level first"
                waiting = waiting or need
        return ("wait", waiting) if waiting else ("ready", "")

    # -- running ------------------------------------------------------------------------------

    def _prefix(self) -> str:
        self.started += 1
        return f"[{self.started}/{self.total}]"

    def _fail(self, run: Run, message: str) -> None:
        self.status[run.name] = "failed"
        self.outcome.failed[run.name] = message
        fileio.write_text(_failure_path(self.out, run.name), message + "\n")
        blocked = [r.name for r in self.plan.dependents(run.name)]
        also = f"; not starting {', '.join(blocked)}" if blocked else ""
        self.say(f"FAILED {run.name}: {message}{also}")

    def _succeed(self, run: Run) -> None:
        self.status[run.name] = "done"
        self.outcome.done.append(run.name)
        self.say(f"done {run.name}{_result_note(run, self.out)}")

    def _run_here(self, run: Run) -> None:
        self.say(f"{self._prefix()} {run.name} ({run_state(run, self.out)}, {self.device})")
        _failure_path(self.out, run.name).unlink(missing_ok=True)
        try:
            execute_run(run, self.out, self.device, self.speeds[run.name])
        except KeyboardInterrupt:
            raise
        except Exception as err:
            path = log_path(self.out, run.name)
            fileio.write_text(path, traceback.format_exc())
            known = isinstance(err, InputError | TrainingError)
            message = str(err) if known else f"{type(err).__name__}: {err} (traceback in {path})"
            self._fail(run, fileio.one_line(message))
            return
        self._succeed(run)

    def _start_worker(self, run: Run) -> None:
        assert self.worker_command is not None
        slot = self.free.pop(0)
        where = dict(slot.env).get("CUDA_VISIBLE_DEVICES")
        device = f"GPU {where}" if where is not None else slot.device
        self.say(f"{self._prefix()} {run.name} ({run_state(run, self.out)}, {device})")
        _failure_path(self.out, run.name).unlink(missing_ok=True)
        path = log_path(self.out, run.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "a")  # noqa: SIM115 (closed when the worker is reaped)
        process = subprocess.Popen(
            self.worker_command(run.name, slot.device),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **dict(slot.env)},
            start_new_session=True,  # a Ctrl-C reaches the workers once, from _stop_workers
        )
        self.running[run.name] = _Worker(run, slot, process, log)

    def _reap(self) -> bool:
        """Collect the workers that ended; True if any did."""
        ended = [w for w in self.running.values() if w.process.poll() is not None]
        for worker in ended:
            worker.log.close()
            del self.running[worker.run.name]
            self.free.append(worker.slot)
            if worker.process.returncode == 0:
                self._succeed(worker.run)
            else:
                path = log_path(self.out, worker.run.name)
                lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
                last = lines[-1].removeprefix("contraseg: error: ") if lines else "no output"
                self._fail(
                    worker.run,
                    f"{last} (exit status {worker.process.returncode}; log in {path})",
                )
        return bool(ended)

    def _stop_workers(self) -> None:
        """Ctrl-C: each worker gets one SIGINT, so it checkpoints and stops as a run does."""
        for worker in self.running.values():
            with contextlib.suppress(OSError):
                worker.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in self.running.values():
            try:
                worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.log.close()
        self.running.clear()

    # -- the loop ---------------------------------------------------------------------------

    def _pass(self) -> bool:
        """Start what can start; True if anything changed."""
        self._external.clear()
        changed = False
        for run in list(self.todo):
            verdict, detail = self._readiness(run)
            if verdict == "blocked":
                self.todo.remove(run)
                self.status[run.name] = "blocked"
                self.outcome.blocked[run.name] = detail
                self.say(f"not starting {run.name}: {detail}")
                changed = True
            elif verdict == "wait":
                if detail in self.running or any(r.name == detail for r in self.todo):
                    continue
                first = self.waiting_since.setdefault(run.name, time.monotonic())
                if time.monotonic() - first > self.wait_timeout:
                    self.todo.remove(run)
                    self.status[run.name] = "blocked"
                    why = f"waited {self.wait_timeout:.0f} s for {detail} (another shard)"
                    self.outcome.blocked[run.name] = why
                    self.say(f"not starting {run.name}: {why}")
                    changed = True
            elif not self.slots:
                self.todo.remove(run)
                self._run_here(run)
                return True  # in order: look again from the first run
            elif self.free:
                self.todo.remove(run)
                self._start_worker(run)
                changed = True
        return changed

    def run(self) -> Outcome:
        announced: set[str] = set()
        try:
            while self.todo or self.running:
                changed = self._pass()
                if self.running:
                    while not self._reap():
                        time.sleep(0.2)
                elif self.todo and not changed:
                    ours = {r.name for r in self.todo}
                    needs = sorted({n for r in self.todo for n in r.needs} - ours - announced)
                    if needs:
                        self.say(f"waiting for {', '.join(needs)} (run by another process)")
                        announced.update(needs)
                    time.sleep(POLL_S)
        except KeyboardInterrupt:
            self._stop_workers()
            raise
        return self.outcome


def run_plan(
    plan: Plan,
    runs: Sequence[Run],
    device: str = "auto",
    slots: Sequence[Slot] | None = None,
    worker_command: Callable[[str, str], list[str]] | None = None,
    wait: bool = True,
    wait_timeout: float = 86400.0,
    say: Callable[[str], None] = print,
    no_compile: bool = False,
) -> Outcome:
    """Run ``runs`` (a subset of ``plan``, in plan order) as their dependencies allow.

    Without ``slots`` every run trains in this process on ``device``, compiled as
    :func:`compile_choices` says (never with ``no_compile``); with them, each slot runs one
    worker process at a time (``worker_command(run name, device)``). A dependency outside
    ``runs`` is another process's: with ``wait`` it is awaited (polling the output folder, at
    most ``wait_timeout`` seconds per run), without it a run whose dependency is not finished
    is not started.
    """
    scheduler = _Scheduler(
        plan, runs, device, slots, worker_command, wait, wait_timeout, say, no_compile
    )
    outcome = scheduler.run()
    sys.stdout.flush()
    return outcome
