"""Process-group set-up from torchrun's environment, and its no-op behaviour without torchrun."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from contraseg.errors import InputError
from contraseg.training.distributed import (
    DistributedInfo,
    backend_for,
    barrier,
    broadcast_object,
    destroy_distributed,
    init_distributed,
    is_main,
    torchrun_env,
)

WORLD = 2
TORCHRUN = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_torchrun_env_parses_the_variables():
    assert torchrun_env({}) == DistributedInfo(0, 0, 1)
    info = torchrun_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert info == DistributedInfo(3, 1, 4)
    assert info.enabled and not info.is_main
    assert DistributedInfo().is_main and not DistributedInfo().enabled


@pytest.mark.parametrize(
    ("environ", "key", "problem"),
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK", "missing"),
        ({"RANK": "x", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "RANK", "not an integer"),
        ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "RANK", "not within world size"),
        ({"RANK": "0", "LOCAL_RANK": "-1", "WORLD_SIZE": "2"}, "RANK", "not within world size"),
    ],
)
def test_torchrun_env_names_the_bad_variable(environ, key, problem):
    with pytest.raises(InputError, match=problem) as info:
        torchrun_env(environ)
    assert info.value.path == f"environment variable {key}"


def test_backend_follows_the_device():
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "nccl"


def test_without_torchrun_everything_is_a_no_op(monkeypatch):
    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)
    info, device = init_distributed(torch.device("cpu"))
    assert info == DistributedInfo() and device == torch.device("cpu")
    assert not dist.is_initialized()
    assert is_main()
    barrier()
    assert broadcast_object({"seed": 7}) == {"seed": 7}
    destroy_distributed()


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="needs fewer than 2 GPUs")
def test_more_ranks_than_gpus_is_an_input_error(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="nproc_per_node") as info:
        init_distributed(torch.device("cuda"))
    assert info.value.path == "environment variable LOCAL_RANK"
    assert not dist.is_initialized()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int) -> None:
    """One rank as torchrun would start it; assertion errors reach the parent via mp.spawn."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    info, device = init_distributed(torch.device("cpu"))
    assert info == DistributedInfo(rank, rank, WORLD) and device == torch.device("cpu")
    assert dist.get_backend() == "gloo" and dist.get_world_size() == WORLD
    assert is_main() == (rank == 0)
    assert broadcast_object({"seed": 1234 + rank}) == {"seed": 1234}
    assert broadcast_object(rank, src=1) == 1
    barrier()
    destroy_distributed()
    assert not dist.is_initialized() and is_main()


def test_two_ranks_join_torchruns_group(monkeypatch):
    # The spawned children import this module by name (importlib mode): put its root on the path.
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2]))
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD)
