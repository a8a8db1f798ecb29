"""The process group of a training run launched with ``torchrun --nproc_per_node=N``.

torchrun starts N copies of the command and tells each who it is through the environment
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). A plain
``contraseg ...`` has none of these and runs as the single rank 0, so every helper here is a
no-op without a process group and training code can call them unconditionally.

Backends: NCCL when training on CUDA (each rank on the GPU ``cuda:LOCAL_RANK``), gloo on the
CPU. The contrastive losses gather across ranks through ``contraseg.losses.distributed``.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from contraseg.errors import InputError, TrainingError
from contraseg.losses.distributed import rank_and_world_size

T = TypeVar("T")

ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistributedInfo:
    """Who this process is in the run: global rank, rank on its node, number of ranks."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the only one that logs and writes checkpoints and weights."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def torchrun_env(environ: Mapping[str, str] | None = None) -> DistributedInfo:
    """The rank, local rank and world size that torchrun set; rank 0 of 1 without torchrun.

    InputError naming the variable when some are set and others missing or malformed.
    """
    environ = os.environ if environ is None else environ
    present = [key for key in ENV_KEYS if key in environ]
    if not present:
        return DistributedInfo()
    values = {}
    for key in ENV_KEYS:
        if key not in environ:
            raise InputError(f"environment variable {key}", f"missing while {present} are set")
        try:
            values[key] = int(environ[key])
        except ValueError:
            raise InputError(
                f"environment variable {key}", f"not an integer: {environ[key]!r}"
            ) from None
    info = DistributedInfo(values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"])
    if info.world_size < 1 or not 0 <= info.rank < info.world_size or info.local_rank < 0:
        raise InputError(
            "environment variable RANK",
            f"rank {info.rank} (local {info.local_rank}) is not within world size "
            f"{info.world_size}",
        )
    return info


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU tensors."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device) -> tuple[DistributedInfo, torch.device]:
    """Join torchrun's process group; return who this rank is and the device it trains on.

    On CUDA each rank takes ``cuda:LOCAL_RANK``. Without torchrun (or with one rank) no group
    is created and ``device`` is returned unchanged. A group that already exists (a second
    stage in the same process) is joined as it is.
    """
    info = torchrun_env()
    if not info.enabled:
        return info, device
    if dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        return info, device
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise InputError(
                "environment variable LOCAL_RANK",
                f"local rank {info.local_rank} but only {torch.cuda.device_count()} CUDA "
                f"devices are visible (--nproc_per_node is larger than the GPUs of the node)",
            )
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(device),
        init_method="env://",
        rank=info.rank,
        world_size=info.world_size,
        device_id=device if device.type == "cuda" else None,
    )
    return info, device


def destroy_distributed() -> None:
    """Leave the process group, if any (at the end of a run, on every rank).

    Unreachable objects are collected first: a DistributedDataParallel module left in a
    reference cycle keeps the group alive until the interpreter exits, and gloo's threads,
    which still hold its work, then abort the process (SIGABRT) after a run that ended well.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0 and without a process group."""
    return rank_and_world_size()[0] == 0


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint); no-op alone."""
    if rank_and_world_size()[1] > 1:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it, on every rank (a seed, a decision, an error message).

    Pickled in memory between the run's own ranks (never to or from a file); identity alone.
    """
    if rank_and_world_size()[1] == 1:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """``obj`` of every rank, in rank order (``[obj]`` alone); pickled in memory between the
    run's own ranks, like :func:`broadcast_object`."""
    world_size = rank_and_world_size()[1]
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


class PeerFailed(TrainingError):
    """Another rank stopped with an error (which that rank reports); this one stops too, with
    the exit status that error has (2 for bad input, 1 otherwise)."""

    def __init__(self, rank: int, message: str, status: int) -> None:
        super().__init__(f"rank {rank} stopped: {message}")
        self.status = status


def agree(error: Exception | None) -> None:
    """Every rank calls this at the same point with what it met (None: nothing); then every
    rank raises: its own error, or :class:`PeerFailed` for the first rank that met one.

    A rank that stopped alone would leave the others waiting for it in the next collective
    until a timeout; this is the barrier where they learn of it instead. Alone, it raises
    ``error`` if any.
    """
    shown = None if error is None else (str(error), 2 if isinstance(error, InputError) else 1)
    reports = all_gather_object(shown)
    if error is not None:
        raise error
    for rank, report in enumerate(reports):
        if report is not None:
            raise PeerFailed(rank, *report)
