"""Process-group set-up from torchrun's environment, its no-op behaviour without torchrun, and
the stages trained by two gloo ranks: resume, rank 0's side effects, errors that stop both."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from contraseg import config as config_module
from contraseg import fileio
from contraseg.config import FinetuneRun, PretrainGlobalRun
from contraseg.errors import InputError
from contraseg.models.unet import UNet
from contraseg.training import stages
from contraseg.training import trainer as trainer_module
from contraseg.training.checkpoint import load_checkpoint, load_weights
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
from contraseg.training.stages import Finetuner, GlobalPretrainer
from contraseg.training.trainer import RunLock, Speed, Trainer, synchronised_batchnorm

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
def test_synchronised_batchnorm_keeps_every_tensor_the_run_holds():
    """--sync-batchnorm swaps the layers, not their tensors: the optimizer built before, the
    checkpoints and the weights files hold the same parameters and statistics. Only converted
    here (SyncBatchNorm runs on GPUs); CPU ranks are refused with one line, before the run
    writes anything (Trainer checks it when it is built)."""
    unet = UNet(widths=(4, 8, 8, 8, 8, 8))
    tensors = unet.state_dict(keep_vars=True)
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in unet.modules())
    net = synchronised_batchnorm(unet, torch.device("cuda"))
    assert norms > 0 and sum(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules()) == norms
    assert not any(type(m) is torch.nn.BatchNorm2d for m in net.modules())
    converted = net.state_dict(keep_vars=True)
    assert converted.keys() == tensors.keys()
    assert all(converted[key] is tensors[key] for key in tensors)
    with pytest.raises(InputError, match=r"--sync-batchnorm needs GPU ranks"):
        synchronised_batchnorm(UNet(widths=(4, 8, 8, 8, 8, 8)), torch.device("cpu"))


def test_sync_batchnorm_on_cpu_ranks_is_refused_before_anything_is_written(
    tiny_config, tmp_path, monkeypatch
):
    two_ranks = (DistributedInfo(rank=0, local_rank=0, world_size=2), torch.device("cpu"))
    monkeypatch.setattr(trainer_module, "init_distributed", lambda device: two_ranks)
    config = tiny_config(PretrainGlobalRun, "optim.iterations=2")
    with pytest.raises(InputError, match="--sync-batchnorm needs GPU ranks"):
        GlobalPretrainer(config, tmp_path / "run", "cpu", Speed(sync_batchnorm=True))
    assert not (tmp_path / "run").exists()


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


def _as_torchrun_rank(rank: int, port: int) -> None:
    """The environment torchrun gives rank ``rank`` of WORLD on this host."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def _worker(rank: int, port: int) -> None:
    """One rank as torchrun would start it; assertion errors reach the parent via mp.spawn."""
    _as_torchrun_rank(rank, port)
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


# ---- a data-parallel run of the stages ------------------------------------------------------

SIDE_EFFECTS = (
    (trainer_module, "save_checkpoint"),
    (trainer_module, "save_weights"),
    (stages, "save_weights"),
    (fileio, "write_text"),
    (config_module, "save_config"),
    (RunLock, "acquire"),
    (Trainer, "log"),
    (Finetuner, "write_products"),
)


def _spy(calls: list[str]) -> None:
    """Record every call that writes into a run directory."""
    for owner, name in SIDE_EFFECTS:
        original = getattr(owner, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(owner, name, wrapped)


def _stage_worker(rank: int, port: int, configs: dict, out: Path) -> None:
    """Both ranks: a pre-training run stopped at iteration 3 and resumed (checkpoint at 2), the
    same run uninterrupted, a short fine-tuning with validation, and a run that rank 0 refuses."""
    _as_torchrun_rank(rank, port)
    calls: list[str] = []
    _spy(calls)
    printed = io.StringIO()
    report: dict = {}
    original = GlobalPretrainer.compute_loss

    def stop_at_3(self, iteration):
        if iteration == 3:
            raise KeyboardInterrupt
        return original(self, iteration)

    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        GlobalPretrainer.compute_loss = stop_at_3
        try:
            GlobalPretrainer(configs["global"], out / "resumed", "cpu").run()
        except KeyboardInterrupt:
            report["interrupted"] = True
        GlobalPretrainer.compute_loss = original
        resumed = GlobalPretrainer(configs["global"], out / "resumed", "cpu")
        report["world"] = [resumed.rank, resumed.world_size]
        resumed.run()
        report["resumed_from"] = resumed._saved_iteration
        GlobalPretrainer(configs["global"], out / "straight", "cpu").run()
        Finetuner(configs["finetune"], out / "finetune", "cpu").run()
        try:
            GlobalPretrainer(configs["global"], out / "not-a-run", "cpu").run()
        except Exception as err:
            report["refused"] = [type(err).__name__, getattr(err, "status", None), str(err)]
    destroy_distributed()
    report["calls"] = calls
    report["printed"] = printed.getvalue()
    (out / f"rank{rank}.json").write_text(json.dumps(report))


@pytest.mark.slow
def test_two_ranks_train_resume_and_leave_the_run_directory_to_rank_0(
    tiny_config, tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2]))
    configs = {
        "global": tiny_config(
            PretrainGlobalRun,
            "optim.iterations=4",
            "optim.checkpoint_every=2",
            "loss.volumes_per_batch=2",
        ),
        "finetune": tiny_config(
            FinetuneRun, "optim.iterations=2", "optim.batch_size=2", "finetune.val_every=1"
        ),
    }
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "not-a-run" / "notes.txt").write_text("mine")
    mp.spawn(_stage_worker, args=(_free_port(), configs, tmp_path), nprocs=WORLD)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    assert [r["world"] for r in ranks] == [[0, WORLD], [1, WORLD]]
    assert all(r["interrupted"] and r["resumed_from"] == 4 for r in ranks)
    # the resumed run (checkpoint of iteration 2) ends where the uninterrupted one does
    resumed = load_weights(tmp_path / "resumed" / "weights.safetensors")
    straight = load_weights(tmp_path / "straight" / "weights.safetensors")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    state = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert state["world_size"] == WORLD and state["rng_augment"].shape[0] == WORLD
    assert not torch.equal(state["rng_augment"][0], state["rng_augment"][1])  # own streams
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").open()]
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4]
    validated = [json.loads(line) for line in (tmp_path / "finetune" / "metrics.jsonl").open()]
    assert [row["iteration"] for row in validated if "val_dice" in row] == [1, 2]
    assert (tmp_path / "finetune" / "model.json").is_file()

    # rank 0 alone writes and prints; an input error on rank 0 stops rank 1 quietly
    assert {"save_checkpoint", "save_weights", "write_text", "log", "acquire"} <= set(
        ranks[0]["calls"]
    )
    assert ranks[1]["calls"] == [] and ranks[1]["printed"] == ""
    assert ranks[0]["printed"].count("done at iteration") == 3  # resumed, straight, finetune
    assert (
        ranks[0]["refused"][0] == "InputError" and "not a contraseg run" in ranks[0]["refused"][2]
    )
    assert ranks[1]["refused"][:2] == ["PeerFailed", 2]
    assert [p.name for p in (tmp_path / "not-a-run").iterdir()] == ["notes.txt"]
