"""The training loop shared by the three stages, with the hooks each stage fills in.

A :class:`Trainer` owns what every stage needs and nothing stage-specific: the run directory
(``config.yaml``, ``metrics.jsonl``, TensorBoard events, ``checkpoints/last.pt``, final weights
as safetensors), resuming from the last checkpoint, bf16 autocast on CUDA, a progress bar, and
a guard that stops the run when the loss is no longer finite. A stage subclasses it and
overrides the hooks, in the manner of nnU-Net's trainer:

- :meth:`setup` builds ``self.model`` (every module whose state is checkpointed) and
  ``self.optimizer``;
- :meth:`compute_loss` draws a batch and returns the loss of one iteration with scalars to log;
- :meth:`validate` (optional) scores the model and returns scalars to log;
- :meth:`final_weights` says which tensors are the stage's product;
- :meth:`summary` is the line printed when the stage ends.

All randomness flows from three generators seeded by ``config.seed`` and saved in every
checkpoint (a torch generator for sampling, one for augmentation, torch's global generator for
initialisation), so that a resumed run on the CPU ends with the same weights as an uninterrupted
one. The rules of a run directory (what is ours, locking, resume, failures) are in
docs/training.md.

Speed (docs/training.md, "Speed and several GPUs"): the loop never waits for the device
between log, validation and checkpoint points; convolution weights are channels-last and Adam
is fused; on CUDA it trains under bf16 autocast and, for runs long enough to pay for the
compilation, ``torch.compile`` with CUDA graphs (:class:`Speed` chooses otherwise). Under
``torchrun --nproc_per_node=N`` the stage's network (``self.net``) runs in
``DistributedDataParallel``; every rank trains, rank 0 alone writes the run directory, and an
error met by one rank stops all of them (:func:`~contraseg.training.distributed.agree`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import autonotebook, std
from tqdm.auto import tqdm

from contraseg import config as config_module
from contraseg import fileio
from contraseg.data.sampling import SlicePool
from contraseg.errors import InputError, TrainingError
from contraseg.inference.device import resolve_device
from contraseg.training.checkpoint import (
    first_non_finite,
    load_checkpoint,
    save_checkpoint,
    save_weights,
    schema_problem,
)
from contraseg.training.distributed import (
    agree,
    all_gather_object,
    broadcast_object,
    init_distributed,
)

try:
    import fcntl
except ImportError:  # Windows: run directories are not locked
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# Keys of a run's config that may change between a run and its resumption.
RESUMABLE_CHANGES = {"optim.iterations", "optim.checkpoint_every", "optim.log_every"}

# A run directory is recognised by MARKER; LOCK is held while a process trains in it. `--fresh`
# deletes what a run writes (RUN_FILES, RUN_FOLDERS, and atomic-write leftovers of those files)
# and nothing else.
MARKER = ".contraseg-run"
LOCK = ".contraseg-lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "weights.safetensors", "model.json")
RUN_FOLDERS = ("checkpoints", "tensorboard", "evaluation")

# disable=None: no bar when stderr is not a terminal (a log file, a pipe, a test); tqdm.auto's
# notebook bar is a widget, not terminal output, so it stays on.
_BAR_DISABLE = None if autonotebook.tqdm is std.tqdm else False


# torch.compile is chosen by default on CUDA for runs with at least this many iterations left:
# the iterations in which a faster step repays the compilation. Measured by bench/gpu.sh on an
# H200 at the paper's sizes (BENCHMARKS.md, "When torch.compile pays for itself"): 1850, 3250
# and 3770 iterations for the global, local and fine-tuning stages.
COMPILE_MIN_ITERATIONS = 4000
# Where torch.compile's errors come from (see Trainer._compile_failure).
COMPILER_MODULES = ("torch._dynamo", "torch._inductor")
# Seeds of the ranks' augmentation generators lie this far apart (seeds are below 2**32).
RANK_SEED_STRIDE = 2**33


@dataclass(frozen=True)
class Speed:
    """How a run uses its device; None: the default for the device. None of these changes what
    is computed, only how fast and to what rounding (docs/training.md, "Speed and several
    GPUs").

    - ``compile``: ``torch.compile`` the stage's network, with its augmentation and loss (with
      CUDA graphs on one GPU); by default on CUDA when at least ``COMPILE_MIN_ITERATIONS``
      iterations are left.
    - ``compile_backend``: torch.compile's backend, a name or a callable ("aot_eager" traces
      without generating code, which is how the CPU tests check that the networks compile).
    - ``autocast``: bf16 autocast of the forward pass (default on CUDA).
    - ``channels_last``: convolution weights in channels-last layout (default on every
      device: faster on the CPU as on the GPU, BENCHMARKS.md).
    - ``fused_adam``: Adam's fused kernel (default on every device: on the CPU it replaces
      ten operators per parameter tensor by one call per step, BENCHMARKS.md).
    - ``pool_budget``: bytes the device-resident slice pool may take (default
      ``contraseg.data.sampling.default_budget``); a larger pool is gathered on the host.
    - ``sync_batchnorm``: with several ranks, batch norm over every rank's images
      (``SyncBatchNorm``, GPU ranks only); by default each rank normalises its own.
    - ``cudnn_benchmark``: let cuDNN time its convolution algorithms for the training step's
      shapes (``torch.backends.cudnn.benchmark``, during training steps only: validation's
      shapes vary with the volumes). Off until ``bench/gpu.sh`` shows that it wins.
    """

    compile: bool | None = None
    compile_backend: str | Callable[..., Any] = "inductor"
    autocast: bool | None = None
    channels_last: bool | None = None
    fused_adam: bool | None = None
    pool_budget: int | None = None
    sync_batchnorm: bool = False
    cudnn_benchmark: bool = False


def compile_by_default(device: torch.device, iterations_left: int) -> bool:
    """Whether a run compiles its network when :class:`Speed` leaves it open: on CUDA, when
    enough iterations are left to repay the compilation."""
    return device.type == "cuda" and iterations_left >= COMPILE_MIN_ITERATIONS


@contextlib.contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` on inside when ``on`` (else as it was), restored
    after: a training step's forward and backward run under it (:class:`Speed`)."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on or previous
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def synchronised_batchnorm(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` with its batch norm layers replaced, in place, by ``SyncBatchNorm`` layers that
    hold the same parameter and statistic tensors: the optimizer, the checkpoints and the
    weights files stay as they are."""
    _require_gpu_ranks(device)
    return nn.SyncBatchNorm.convert_sync_batchnorm(net)


def _require_gpu_ranks(device: torch.device) -> None:
    """PyTorch synchronises batch norm on GPUs only."""
    if device.type != "cuda":
        raise InputError(
            None,
            "--sync-batchnorm needs GPU ranks (PyTorch's SyncBatchNorm does not run on the "
            "CPU); drop it to train with each rank's own batch statistics",
        )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class RunLock:
    """An exclusive ``flock`` on ``LOCK`` inside a run directory; the file names its holder.

    The lock belongs to the open file, so the OS frees it however the holder exits (``kill -9``
    included). The file is removed on release; a process that opened it just before would then
    lock a deleted file, so after locking, the path must still name the file that was locked.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                if isinstance(err, BlockingIOError):
                    raise InputError(
                        self.path.parent,
                        f"is in use by {_describe_holder(holder)}; wait for that run to end "
                        "or choose another folder",
                    ) from None
                raise InputError(self.path, f"cannot lock: {err.strerror}") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"process {holder['pid']} on {holder['host']} (started {holder['started']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def claim_run_dir(run_dir: Path, lock: RunLock) -> list[Path]:
    """Refuse a folder that is neither new, empty nor a run directory (it has no ``MARKER``);
    create it and take ``lock``; return the folders created (deepest first)."""
    if run_dir.is_dir():
        try:
            names = {path.name for path in run_dir.iterdir()}
        except OSError as err:
            raise InputError(run_dir, f"cannot list: {err.strerror}") from None
        if names - {LOCK} and MARKER not in names:
            raise InputError(
                run_dir,
                f"is not empty and is not a contraseg run directory (it has no {MARKER}); "
                "give a new or empty folder",
            )
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except BaseException:
        remove_empty(created)
        raise
    return created


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders this run created (deepest first) as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


class Trainer:
    """Base class of the stages; see the module docstring for the hooks.

    A stage's :meth:`setup` may also set ``self.net``, the module whose forward turns images
    into what the loss takes (embeddings, logits) and holds every trained parameter: that is
    the module data parallelism wraps and ``torch.compile`` compiles. Its parameters that never
    get a gradient must have ``requires_grad`` False. With it, two pure functions are compiled
    alongside it: ``self.augment_fn``, which applies a batch's augmentation parameters (drawn
    on the host, ``contraseg.data.augment``) to its images, and ``self.loss_fn``, which turns
    the network's output into the loss.
    """

    stage = "train"
    net: nn.Module | None = None
    augment_fn: Callable[..., Any] | None = None
    loss_fn: Callable[..., Tensor] | None = None

    def __init__(
        self, config: Any, run_dir: str | Path, device: str = "auto", speed: Speed | None = None
    ) -> None:
        self.config = config
        self.run_dir = fileio.check_out_dir(run_dir)
        info, self.device = init_distributed(resolve_device(device))
        self.rank, self.world_size, self.is_main = info.rank, info.world_size, info.is_main
        self.speed = speed or Speed()
        if self.speed.sync_batchnorm and self.world_size > 1:
            _require_gpu_ranks(self.device)  # before anything is written
        cuda = self.device.type == "cuda"
        self.autocast = cuda if self.speed.autocast is None else self.speed.autocast
        self.channels_last = self.speed.channels_last is not False
        self.fused_adam = self.speed.fused_adam is not False
        self.compiled = False  # decided when the loop starts, from the iterations left
        self.cuda_graphs = False  # compiled with CUDA graphs (one GPU)
        self.iteration = 0
        self.sample_generator = torch.Generator().manual_seed(config.seed + 2)
        self.augment_generator = torch.Generator().manual_seed(
            config.seed + 1 + RANK_SEED_STRIDE * self.rank
        )
        torch.manual_seed(config.seed)
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer
        self._writer: Any = None
        self._lock = RunLock(self.run_dir)
        self._saved_iteration: int | None = None  # of the checkpoint on disk, if any
        self._pending: list[torch.Tensor] = []  # losses since the last check, on the device
        self._unwrapped: nn.Module | None = None  # self.net before DDP, while a run holds it
        self._stop_requested = False

    # ---- hooks --------------------------------------------------------------------------

    def setup(self) -> None:
        raise NotImplementedError

    def compute_loss(self, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def validate(self, iteration: int) -> dict[str, float] | None:
        return None

    def should_validate(self, iteration: int) -> bool:
        return False

    def final_weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def extra_state(self) -> dict[str, Any]:
        """Stage-specific state to checkpoint (tensors and primitives only)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved (already checked to have its structure)."""

    def write_products(self) -> None:
        """Write what the stage adds beside ``weights.safetensors`` (fine-tuning: model.json)."""

    def summary(self) -> str:
        """The line printed on stdout when the stage has written its product."""
        return f"{self.stage}: done at iteration {self.iteration}; weights in {self.weights_path}"

    # ---- what the stages build with --------------------------------------------------------

    def adam(self, params: Iterable[nn.Parameter]) -> torch.optim.Adam:
        """Adam at ``optim.lr``, fused where :class:`Speed` says so."""
        return torch.optim.Adam(params, lr=self.config.optim.lr, fused=self.fused_adam or None)

    def slice_pool(self, volumes: list[Any], labels: list[Any] | None = None) -> SlicePool:
        """The volumes (and labels) on the training device, within the pool budget."""
        return SlicePool(volumes, labels, self.device, self.speed.pool_budget)

    # ---- paths ---------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def weights_path(self) -> Path:
        return self.run_dir / "weights.safetensors"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    # ---- the run ------------------------------------------------------------------------

    def run(self, fresh: bool = False) -> Path:
        """Train to ``config.optim.iterations``, resuming from the last checkpoint unless
        ``fresh``; print :meth:`summary` and return the run directory.

        Everything that can fail on bad input (the folder, the config, :meth:`setup`, the
        checkpoint) fails before the run directory is written to; a folder created for the run
        is then removed again. With several ranks, rank 0 alone touches the run directory.
        """
        created = self._on_main(self._claim_run_dir) or []
        try:
            try:
                state, log = self._prepare(fresh)
            except BaseException as err:
                self._lock.release()
                remove_empty(created)
                if isinstance(err, KeyboardInterrupt) and self.is_main:
                    print(f"{self.stage}: interrupted before training started", file=sys.stderr)
                raise
            try:
                self._begin(fresh, state, log)
                self._loop()
                self._on_main(self._write_weights)
            except KeyboardInterrupt:
                if self.is_main:
                    print(self._interrupted(fresh), file=sys.stderr)
                raise
        finally:
            if self._writer is not None:
                self._writer.close()
            self._lock.release()
            if self._unwrapped is not None:  # see destroy_distributed: DDP holds the group
                self.net, self._unwrapped = self._unwrapped, None
        if self.is_main:
            print(self.summary())
        return self.run_dir

    def _on_main(self, work: Any) -> Any:
        """``work()`` on rank 0 alone, the other ranks waiting; an error there stops every
        rank (:func:`agree`). Returns what ``work`` returned (None on the other ranks)."""
        result, error = None, None
        if self.is_main:
            try:
                result = work()
            except Exception as err:
                error = err
        agree(error)
        return result

    def _write_weights(self) -> None:
        weights = self.final_weights()
        self._require_finite(weights, "the final weights")
        save_weights(self.weights_path, weights)
        self.write_products()

    def _claim_run_dir(self) -> list[Path]:
        return claim_run_dir(self.run_dir, self._lock)

    def _prepare(self, fresh: bool) -> tuple[dict[str, Any] | None, str | None]:
        """Check the config against the run's, :meth:`setup`, load and check the checkpoint
        and the log; return the checkpoint (None: start from scratch) and the log's new text
        (None: unchanged). Rank 0 does this first (it may prepare the dataset's cache), then
        the other ranks set up and receive its checkpoint."""

        def prepare() -> tuple[dict[str, Any] | None, str | None]:
            resume = not fresh and self.checkpoint_path.exists()
            if resume:
                self._check_same_config(self.run_dir / "config.yaml")
            self._set_up_model()
            state = None
            if resume:
                state = load_checkpoint(self.checkpoint_path)
                self._check_checkpoint(state)
            log = None if fresh else self._resumed_log(state["iteration"] if state else 0)
            return state, log

        prepared = self._on_main(prepare)
        if self.world_size == 1:
            return prepared
        error = None
        if not self.is_main:
            try:
                self._set_up_model()
            except Exception as err:
                error = err
        agree(error)
        state = broadcast_object(prepared[0] if self.is_main else None)
        return state, prepared[1] if self.is_main else None

    def build(self) -> None:
        """Set the stage up on its device and wrap its network, without a run directory: for
        benchmarks and notebooks that call :meth:`train_step` themselves."""
        self._set_up_model()
        self._accelerate()

    def _set_up_model(self) -> None:
        self.setup()
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _begin(self, fresh: bool, state: dict[str, Any] | None, log: str | None) -> None:
        """Write the run directory's files, restore the checkpoint, if any, and wrap the
        network for the loop."""

        def write() -> None:
            if fresh:
                self._clear_run()
            fileio.write_text(self.run_dir / MARKER, f"contraseg {self.stage} run directory\n")
            config_module.save_config(self.config, self.run_dir / "config.yaml")
            if log is not None:
                fileio.write_text(self.metrics_path, log)
            self._trim_events(state["iteration"] if state else 0)

        self._on_main(write)
        if state is not None:
            self._restore(state)
            self._saved_iteration = self.iteration
        self._accelerate()

    def _accelerate(self) -> None:
        """``self.net`` in DistributedDataParallel with several ranks, then compiled where
        :class:`Speed` (or its default) says so."""
        if self.net is None:
            if self.world_size > 1:
                raise TrainingError(
                    f"{self.stage} trains in one process only (it has no single network to "
                    "wrap data-parallel); start it without torchrun"
                )
            return
        net = self.net
        cuda = self.device.type == "cuda"
        if self.world_size > 1:
            self._unwrapped = net
            if self.speed.sync_batchnorm:
                net = synchronised_batchnorm(net, self.device)
            net = DistributedDataParallel(net, device_ids=[self.device.index] if cuda else None)
        left = self.config.optim.iterations - self.iteration
        choice = self.speed.compile
        self.compiled = compile_by_default(self.device, left) if choice is None else choice
        if self.compiled:
            # CUDA graphs replay each step with one launch; with DDP its hooks need eager.
            self.cuda_graphs = cuda and self.world_size == 1
            mode = "reduce-overhead" if self.cuda_graphs else None
            net = torch.compile(net, backend=self.speed.compile_backend, mode=mode)
            # augmentation and loss are a few dozen small kernels each: one launch each
            backend = self.speed.compile_backend
            for name in ("augment_fn", "loss_fn"):
                function = getattr(self, name)
                if function is not None:
                    setattr(self, name, torch.compile(function, backend=backend, mode=mode))
        self.net = net

    def _clear_run(self) -> None:
        """``--fresh``: delete what a run writes, keep anything else the folder holds."""
        for name in RUN_FOLDERS:
            shutil.rmtree(self.run_dir / name, ignore_errors=True)
        for name in RUN_FILES:
            (self.run_dir / name).unlink(missing_ok=True)
            for leftover in self.run_dir.glob(f".{name}.*.tmp"):
                leftover.unlink(missing_ok=True)

    def _interrupted(self, fresh: bool) -> str:
        if self._saved_iteration is None:
            resume = "no checkpoint was written, so the next run starts over"
        else:
            command = "the same command without --fresh" if fresh else "the same command"
            resume = f"{command} resumes from the checkpoint of iteration {self._saved_iteration}"
        return f"{self.stage}: interrupted after iteration {self.iteration}; {resume}"

    # ---- the loop -----------------------------------------------------------------------

    def train_step(self, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        """One iteration: the stage's loss under autocast, backward, Adam; waits for nothing."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        self.model.train()
        with cudnn_benchmark(self.speed.cudnn_benchmark):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss, stats = self.compute_loss(iteration)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        if self.cuda_graphs:  # a compiled loss lives in the graph's memory, reused next step
            loss = loss.detach().clone()
        return loss, stats

    def _loop(self) -> None:
        """Iterate without waiting for the device: the loss stays there until the next log,
        validation or checkpoint, where every loss since the last such point is checked."""
        optim = self.config.optim
        iterations = optim.iterations
        bar = tqdm(
            total=iterations,
            initial=self.iteration,
            desc=self.stage,
            unit="it",
            dynamic_ncols=True,
            disable=_BAR_DISABLE if self.is_main else True,
        )
        with bar, self._stop_at_ctrl_c():
            while self.iteration < iterations:
                iteration = self.iteration + 1
                try:
                    loss, stats = self.train_step(iteration)
                except Exception as err:
                    failure = self._compile_failure(err)
                    if failure is None:
                        raise
                    raise failure from err
                self.iteration = iteration
                self._pending.append(loss.detach())
                bar.update(1)
                last = iteration == iterations
                validate = self.should_validate(iteration) or last
                log = validate or iteration % optim.log_every == 0 or iteration == 1
                save = iteration % optim.checkpoint_every == 0 or last or self._stop_requested
                if not (log or save):
                    continue
                value = self._check_losses()
                if validate or save:
                    self._require_finite(self._state_tensors(), "the model's state")
                if log:
                    stats = {"loss": value, **{k: float(v) for k, v in stats.items()}}
                    if validate:
                        stats.update(
                            self._on_main(functools.partial(self.validate, iteration)) or {}
                        )
                    if self.is_main:
                        self.log(iteration, stats)
                    bar.set_postfix({k: f"{v:.4f}" for k, v in stats.items()}, refresh=False)
                if save:
                    self._save()
                if self._stop_requested:
                    raise KeyboardInterrupt

    def _compile_failure(self, err: Exception) -> TrainingError | None:
        """An error of torch.compile's (it compiles at the first steps) as one line that says
        how to train without it; None for any other error."""
        if not (self.compiled and type(err).__module__.startswith(COMPILER_MODULES)):
            return None
        detail = " ".join(str(err).split())[:200]
        return TrainingError(
            f"{self.stage}: torch.compile failed ({type(err).__name__}: {detail}); "
            "run the same command with --no-compile"
        )

    @contextlib.contextmanager
    def _stop_at_ctrl_c(self) -> Iterator[None]:
        """The first Ctrl-C lets the current iteration finish and be checkpointed, so that an
        interrupted run loses nothing; a second one stops at once. Only where Python's own
        handler is installed (the main thread, SIGINT not ignored) and with one rank: ranks
        would see the signal at different iterations, so under torchrun it stops at once."""
        previous = signal.getsignal(signal.SIGINT)
        if (
            previous is not signal.default_int_handler
            or threading.current_thread() is not threading.main_thread()
            or self.world_size > 1
        ):
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            self._stop_requested = True
            signal.signal(signal.SIGINT, previous)

        signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _check_losses(self) -> float:
        """Check the losses since the last check (one host sync); return the latest. With
        several ranks, the mean over ranks (fine-tuning's losses differ by rank), so that
        every rank logs and stops alike."""
        losses = torch.stack([loss.float().reshape(()) for loss in self._pending])
        if self.world_size > 1:
            dist.all_reduce(losses)
            losses /= self.world_size
        values = losses.tolist()
        first = self.iteration - len(values) + 1
        self._pending.clear()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise TrainingError(
                    f"{self.stage}: the loss became {value} at iteration {first + offset}; "
                    f"stopped. {self._kept_note()}"
                )
        return values[-1]

    def _require_finite(self, tensors: dict[str, torch.Tensor], what: str) -> None:
        """Nothing non-finite is checkpointed or saved, even when the loss stayed finite."""
        name = first_non_finite(tensors)
        if name is not None:
            raise TrainingError(
                f"{self.stage}: {what} ({name}) became non-finite by iteration {self.iteration}; "
                f"stopped. {self._kept_note()}"
            )

    def _kept_note(self) -> str:
        if self._saved_iteration is None:
            return "No checkpoint had been written; the same command starts over"
        return (
            f"The last good checkpoint, of iteration {self._saved_iteration}, is kept in "
            f"{self.checkpoint_path}"
        )

    # ---- logging ------------------------------------------------------------------------

    def log(self, iteration: int, stats: dict[str, float]) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps({"iteration": iteration, **stats}) + "\n")
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        for key, value in stats.items():
            self._writer.add_scalar(f"{self.stage}/{key}", value, iteration)

    def _resumed_log(self, iteration: int) -> str | None:
        """The text of ``metrics.jsonl`` up to ``iteration`` (the lines after it are redone),
        or None when it needs no change. A torn last line, which is what a kill during an
        append leaves, is dropped; a damaged line before it is an error."""
        path = self.metrics_path
        if not path.exists():
            return None
        text = path.read_text(errors="replace")
        lines = text.splitlines()
        kept = 0
        for number, line in enumerate(lines, 1):
            step = _logged_iteration(line)
            if step is None:
                if number == len(lines) and not text.endswith("\n"):
                    logger.debug("%s: dropped a torn last line %r", path, line)
                    break
                raise InputError(
                    path,
                    f"line {number} is not a JSON record with an iteration; repair or delete it",
                )
            if step > iteration:
                break
            kept = number
        if not text or (kept == len(lines) and text.endswith("\n")):
            return None
        return "".join(f"{line}\n" for line in lines[:kept])

    def _trim_events(self, iteration: int) -> None:
        """Rewrite the TensorBoard events of a resumed run into one file that ends at
        ``iteration``, so that every step is in the event files once.

        Each SummaryWriter opens a new file, so the iterations redone after a resume would be
        in two files, and TensorBoard's readers disagree on which to show (the Rust data server
        keeps the later point of a step, the Python loader both unless a writer set
        ``purge_step``, other readers both); rewriting the files is right for every reader.
        """
        folder = self.run_dir / "tensorboard"
        files = sorted(folder.glob("events.out.tfevents.*"))
        if not files:
            return
        from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter

        kept: dict[tuple[int, tuple[str, ...]], Event] = {}
        for path in files:  # a later file wins a (step, tags) both hold
            for event in LegacyEventFileLoader(str(path)).Load():
                if event.HasField("summary") and event.step <= iteration:
                    kept[(event.step, tuple(v.tag for v in event.summary.value))] = event
        target = None
        if kept:
            events = [kept[key] for key in sorted(kept)]
            start = min(event.wall_time for event in events)
            # a second before the new writer's, at the latest: readers load files in name order
            stamp = min(int(start), int(time.time()) - 1)
            target = folder / f"events.out.tfevents.{stamp:010d}.{socket.gethostname()}.run"
            with fileio.atomic_path(target) as tmp, open(tmp, "wb") as handle:
                writer = RecordWriter(handle)
                header = Event(wall_time=start, file_version="brain.Event:2")
                for event in (header, *events):
                    writer.write(event.SerializeToString())
        for path in files:
            if path != target:
                path.unlink()

    # ---- run directory and checkpoints ----------------------------------------------------

    def _check_same_config(self, config_path: Path) -> None:
        try:
            previous = config_module.load_config(type(self.config), config_path)
        except InputError as err:
            raise InputError(
                config_path,
                f"is not the config of a {self.stage} run ({err.problem}); "
                "pass --fresh to start over or choose another --out",
            ) from None
        old = _flatten(dataclasses.asdict(previous))
        new = _flatten(dataclasses.asdict(self.config))
        changed = sorted(k for k in old if old[k] != new[k] and k not in RESUMABLE_CHANGES)
        if changed:
            key = changed[0]
            raise InputError(
                config_path,
                f"this run directory holds a run with {key}={old[key]!r}, not {new[key]!r}; "
                "pass --fresh to start over or choose another --out",
            )

    def _state(self, ranks: list[tuple[Tensor, Tensor]] | None = None) -> dict[str, Any]:
        """The checkpoint; ``ranks`` holds every rank's (augmentation, torch) generator states,
        by default this rank's repeated (the shape a checkpoint of this run has)."""
        own = (self.augment_generator.get_state(), torch.get_rng_state())
        ranks = ranks or [own] * self.world_size
        return {
            "stage": self.stage,
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "world_size": self.world_size,
            "rng_sample": self.sample_generator.get_state(),
            "rng_augment": torch.stack([augment for augment, _ in ranks]),
            "rng_torch": torch.stack([global_ for _, global_ in ranks]),
            "extra": self.extra_state(),
        }

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """The model's tensors and the optimiser's per-parameter state, by name."""
        return _named_tensors(self.model.state_dict(), self.optimizer.state_dict())

    def _save(self) -> None:
        """Every rank's generators go into rank 0's checkpoint (every rank calls this)."""
        ranks = all_gather_object((self.augment_generator.get_state(), torch.get_rng_state()))
        self._on_main(lambda: save_checkpoint(self.checkpoint_path, self._state(ranks)))
        self._saved_iteration = self.iteration

    def _check_checkpoint(self, state: Any) -> None:
        stage = state.get("stage") if isinstance(state, dict) else None
        if isinstance(stage, str) and stage != self.stage:
            raise InputError(
                self.checkpoint_path,
                f"is a checkpoint of stage {stage!r}, not {self.stage!r}; "
                "pass --fresh to start over or choose another --out",
            )
        world_size = state.get("world_size") if isinstance(state, dict) else None
        if type(world_size) is int and world_size != self.world_size:
            raise InputError(
                self.checkpoint_path,
                f"was written by a run of {world_size} processes and this run has "
                f"{self.world_size}; resume it with torchrun --nproc_per_node={world_size} "
                "(in all, over the nodes), or pass --fresh to start over",
            )
        problem = self._checkpoint_problem(state)
        if problem:
            raise InputError(
                self.checkpoint_path,
                f"damaged checkpoint: {problem} (delete it, or pass --fresh, to start over)",
            )

    def _checkpoint_problem(self, state: Any) -> str | None:
        """What keeps ``state`` from restoring cleanly, found before any state is touched:
        the structure of a checkpoint written now (keys, types, tensor shapes), an iteration
        within the run, an optimiser state that loads into a copy, random generator states
        that restore into fresh generators, finite tensors."""
        template = self._state()
        del template["optimizer"]
        rest = dict(state) if isinstance(state, dict) else state
        optimizer = rest.pop("optimizer", None) if isinstance(rest, dict) else None
        problem = schema_problem(template, rest)
        if problem or optimizer is None:
            return problem or "the checkpoint lacks 'optimizer'"
        iterations = self.config.optim.iterations
        if not 0 <= state["iteration"] <= iterations:
            return (
                f"its iteration {state['iteration']} is outside 0..{iterations} (optim.iterations)"
            )
        problem = self._optimizer_problem(optimizer)
        if problem:
            return problem
        for key in ("rng_sample", "rng_augment", "rng_torch"):
            try:
                for row in state[key].reshape(-1, state[key].shape[-1]):
                    torch.Generator().set_state(row.clone())
            except (RuntimeError, TypeError) as err:
                return f"{key} does not restore: {err}"
        name = first_non_finite(_named_tensors(state["model"], optimizer))
        return None if name is None else f"{name} holds NaN or infinite values"

    def _optimizer_problem(self, saved: Any) -> str | None:
        """Load ``saved`` into a copy of the optimiser, then check what that load does not:
        each parameter's state has the parameter's shape."""
        try:
            copy.deepcopy(self.optimizer).load_state_dict(saved)
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as err:
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return f"the optimizer state does not fit the model ({detail})"
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for index, entry in saved["state"].items():
            if not (isinstance(index, int) and 0 <= index < len(params)):
                return f"optimizer.state has an entry {index!r} for no parameter"
            if not isinstance(entry, dict):
                return f"optimizer.state.{index} is {type(entry).__name__}, expected dict"
            for key, value in entry.items():
                shape = params[index].shape
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != shape:
                    return (
                        f"optimizer.state.{index}.{key} has shape {tuple(value.shape)}, "
                        f"its parameter {tuple(shape)}"
                    )
        return None

    def _restore(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint that :meth:`_check_checkpoint` accepted."""
        self.model.load_state_dict(state["model"])
        fused = [group.get("fused") for group in self.optimizer.param_groups]  # as built
        self.optimizer.load_state_dict(state["optimizer"])
        self._adapt_optimizer_state(fused)
        self.sample_generator.set_state(state["rng_sample"])
        self.augment_generator.set_state(state["rng_augment"][self.rank].clone())
        torch.set_rng_state(state["rng_torch"][self.rank].clone())
        self.iteration = state["iteration"]
        self.load_extra_state(state["extra"])

    def _adapt_optimizer_state(self, fused: list[bool | None]) -> None:
        """Fit a loaded Adam state to the optimizer as this run built it: its fused choice per
        group, ``fused`` (the checkpoint may come from a run with other options), the step
        counter where that kernel keeps it, moments in their parameter's memory layout
        (channels-last)."""
        for group, group_fused in zip(self.optimizer.param_groups, fused, strict=True):
            if "fused" not in group:
                continue
            group["fused"] = group_fused
            for param in group["params"]:
                entry = self.optimizer.state.get(param, {})
                for key, value in entry.items():
                    if not isinstance(value, Tensor):
                        continue
                    if key == "step":
                        entry[key] = value.to(param.device if group_fused else "cpu")
                    elif value.shape == param.shape:
                        entry[key] = torch.empty_like(param).copy_(value)


def _logged_iteration(line: str) -> int | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    step = row.get("iteration") if isinstance(row, dict) else None
    return step if type(step) is int else None


def _named_tensors(model: dict[str, Any], optimizer: dict[str, Any]) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in model.items()}
    for index, entry in optimizer["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.state.{index}.{key}"] = value
    return tensors
