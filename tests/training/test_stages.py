"""The three stages on a tiny phantom: outputs, weight flow, resume, NaN guard, run-dir rules."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from contraseg.cli import main
from contraseg.config import FinetuneRun, PretrainGlobalRun, PretrainLocalRun
from contraseg.data.sampling import SlicePool
from contraseg.errors import InputError, TrainingError
from contraseg.training import stages
from contraseg.training.checkpoint import load_checkpoint, load_weights
from contraseg.training.stages import (
    Finetuner,
    GlobalPretrainer,
    LocalPretrainer,
    run_finetune,
    run_pretrain_global,
    run_pretrain_local,
)
from contraseg.training.trainer import COMPILE_MIN_ITERATIONS, Speed, compile_by_default


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_outputs(run_dir, iterations):
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "weights.safetensors").is_file()
    assert list((run_dir / "tensorboard").glob("events.*"))
    assert _metrics(run_dir)[-1]["iteration"] == iterations
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] == iterations


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory, tiny_config):
    """Stage 1 (G^D) then stage 2 (L^D) for a few iterations, shared by the tests below."""
    out = tmp_path_factory.mktemp("stages")
    global_dir = run_pretrain_global(
        tiny_config(PretrainGlobalRun, "optim.iterations=3", "loss.volumes_per_batch=2"),
        out / "global",
    )
    local_config = tiny_config(
        PretrainLocalRun,
        "optim.iterations=3",
        "loss.strategy=LD",
        "loss.volumes_per_batch=2",
        f"encoder={global_dir}",
    )
    return global_dir, run_pretrain_local(local_config, out / "local")


def test_pretraining_stages_write_their_outputs(stage_runs):
    global_dir, local_dir = stage_runs
    for run_dir in stage_runs:
        _assert_outputs(run_dir, 3)
        rows = _metrics(run_dir)
        assert all(row["chance"] > 0 for row in rows)
    assert {k.split(".")[0] for k in load_weights(global_dir / "weights.safetensors")} == {
        "encoder",
        "g1",
    }
    local_keys = load_weights(local_dir / "weights.safetensors")
    assert {k.split(".")[0] for k in local_keys} == {"encoder", "decoder", "g2"}
    assert {k.split(".")[1] for k in local_keys if k.startswith("decoder.")} == {"0", "1", "2"}


def test_encoder_is_unchanged_by_stage_two(stage_runs):
    global_dir, local_dir = stage_runs
    first = load_weights(global_dir / "weights.safetensors")
    second = load_weights(local_dir / "weights.safetensors")
    encoder_keys = [k for k in first if k.startswith("encoder.")]
    assert encoder_keys
    for key in encoder_keys:  # BN running statistics included
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize(("init", "which"), [("encoder", 0), ("encoder+decoder", 1)])
def test_finetuning_starts_from_the_pretrained_tensors(
    stage_runs, tiny_config, tmp_path, init, which
):
    source = stage_runs[which]
    config = tiny_config(FinetuneRun, f"finetune.init={init}", f"finetune.pretrained={source}")
    trainer = Finetuner(config, tmp_path / "ft")
    trainer.setup()
    pretrained = load_weights(source / "weights.safetensors")
    own = trainer.unet.state_dict()
    transferred = [k for k in pretrained if k.startswith(("encoder.", "decoder."))]
    assert sorted(transferred) == trainer.transferred
    for key in transferred:
        assert torch.equal(own[key].cpu(), pretrained[key]), key
    if init == "encoder":
        assert not any(k.startswith("decoder.") for k in trainer.transferred)


def test_finetune_validates_and_keeps_the_best_weights(tiny_config, tmp_path):
    config = tiny_config(
        FinetuneRun, "optim.iterations=4", "optim.batch_size=4", "finetune.val_every=2"
    )
    run_dir = run_finetune(config, tmp_path / "ft")
    _assert_outputs(run_dir, 4)
    validated = [row for row in _metrics(run_dir) if "val_dice" in row]
    assert [row["iteration"] for row in validated] == [2, 4]
    best = max(validated, key=lambda row: row["val_dice"])
    assert validated[-1]["best_val_dice"] == pytest.approx(best["val_dice"])
    final = load_weights(run_dir / "weights.safetensors")
    kept = load_weights(run_dir / "checkpoints" / "best.safetensors")
    assert all(torch.equal(final[k], kept[k]) for k in final)


def _interrupt_at(monkeypatch, cls, iteration):
    original = cls.compute_loss

    def compute_loss(self, it):
        if it == iteration:
            raise KeyboardInterrupt
        return original(self, it)

    monkeypatch.setattr(cls, "compute_loss", compute_loss)


RESUMABLE = {
    "pretrain-global": (
        PretrainGlobalRun, GlobalPretrainer, run_pretrain_global, ("loss.volumes_per_batch=2",)
    ),
    "pretrain-local": (
        PretrainLocalRun, LocalPretrainer, run_pretrain_local,
        ("loss.strategy=LD", "loss.volumes_per_batch=2"),
    ),
    "finetune": (
        FinetuneRun, Finetuner, run_finetune, ("optim.batch_size=4", "finetune.val_every=3")
    ),
}  # fmt: skip


@pytest.mark.parametrize("stage", RESUMABLE)
def test_resume_after_interruption_gives_the_same_weights(
    tiny_config, tmp_path, monkeypatch, stage_runs, stage
):
    """Bitwise on the CPU (a GPU's atomics make the uninterrupted run itself vary)."""
    run_class, trainer_class, run, extra = RESUMABLE[stage]
    if stage == "pretrain-local":
        extra = (*extra, f"encoder={stage_runs[0]}")
    config = tiny_config(run_class, "optim.iterations=6", "optim.checkpoint_every=2", *extra)
    straight = run(config, tmp_path / "straight", device="cpu")

    with monkeypatch.context() as patch:
        _interrupt_at(patch, trainer_class, 5)
        with pytest.raises(KeyboardInterrupt):
            run(config, tmp_path / "resumed", device="cpu")
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["iteration"] == 4
    resumed = run(config, tmp_path / "resumed", device="cpu")

    a = load_weights(straight / "weights.safetensors")
    b = load_weights(resumed / "weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _metrics(resumed) == _metrics(straight)


def test_a_pool_on_the_host_trains_and_resumes_as_a_resident_one(
    tiny_config, tmp_path, monkeypatch
):
    """A labelled pool over its memory budget (gathered on the host, the next batch ahead in a
    background thread) trains bit for bit as a resident one, interrupted and resumed too."""
    config = tiny_config(
        FinetuneRun, "optim.iterations=6", "optim.checkpoint_every=2", *RESUMABLE["finetune"][3]
    )
    straight = run_finetune(config, tmp_path / "straight", device="cpu")
    prefetched = []
    prefetch = SlicePool.prefetch
    monkeypatch.setattr(
        SlicePool, "prefetch", lambda pool, *draw: prefetched.append(1) or prefetch(pool, *draw)
    )
    on_host = Speed(pool_budget=0)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, Finetuner, 5)
        with pytest.raises(KeyboardInterrupt):
            run_finetune(config, tmp_path / "resumed", device="cpu", speed=on_host)
    resumed = run_finetune(config, tmp_path / "resumed", device="cpu", speed=on_host)
    assert len(prefetched) >= 6
    a = load_weights(straight / "weights.safetensors")
    b = load_weights(resumed / "weights.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert _metrics(resumed) == _metrics(straight)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny_config, tmp_path, monkeypatch
):
    original = GlobalPretrainer.compute_loss

    def compute_loss(self, it):
        loss, stats = original(self, it)
        return (loss * float("nan") if it == 3 else loss), stats

    monkeypatch.setattr(GlobalPretrainer, "compute_loss", compute_loss)
    config = tiny_config(
        PretrainGlobalRun,
        "optim.iterations=5",
        "optim.checkpoint_every=2",
        "loss.volumes_per_batch=2",
    )
    with pytest.raises(TrainingError, match="nan at iteration 3"):
        run_pretrain_global(config, tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"] == 2


def test_a_run_directory_refuses_a_different_config_unless_fresh(tiny_config, tmp_path):
    base = ("optim.iterations=1", "loss.volumes_per_batch=2")
    run_pretrain_global(tiny_config(PretrainGlobalRun, *base), tmp_path / "run")
    other = tiny_config(PretrainGlobalRun, *base, "loss.temperature=0.5")
    with pytest.raises(InputError, match=r"loss.temperature=0.1"):
        run_pretrain_global(other, tmp_path / "run")
    run_pretrain_global(other, tmp_path / "run", fresh=True)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"] == 1


def test_cli_reports_a_misspelt_key_with_exit_status_2(tmp_path, capsys):
    code = main(["pretrain-global", "--out", str(tmp_path / "r"), "optim.itrations=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "did you mean 'optim.iterations'" in err
    assert not (tmp_path / "r").exists()


def test_local_stage_without_encoder_run_is_a_clear_error(tiny_config, tmp_path):
    config = tiny_config(PretrainLocalRun, f"encoder={tmp_path / 'missing'}")
    with pytest.raises(InputError, match="weights file not found"):
        run_pretrain_local(config, tmp_path / "local")


def test_debug_flag_is_accepted_after_the_command(tmp_path):
    with pytest.raises(InputError):
        main(["pretrain-global", "--out", str(tmp_path / "r"), "--debug", "optim.itrations=3"])


def _cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err.strip()


def test_fewer_slices_than_partitions_names_the_case_file(tiny_config, tmp_path, capsys):
    root = tiny_config(PretrainGlobalRun).data.root
    code, err = _cli(
        [
            "pretrain-global",
            "--out",
            str(tmp_path / "r"),
            f"data.root={root}",
            "data.size=[32,32]",
            "data.target_spacing=[3.0,3.0]",
            "loss.partitions=20",
        ],
        capsys,
    )
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "patient" in err and ".npy" in err and "fewer than 20 partitions" in err


def test_a_split_naming_missing_cases_lists_them(phantom_root, tmp_path, capsys):
    """The phantom's files read as ACDC: the paper's ACDC split names patients it lacks."""
    code, err = _cli(
        [
            "finetune",
            "--out",
            str(tmp_path / "r"),
            "data.dataset=acdc",
            f"data.root={phantom_root}",
            f"data.cache={tmp_path / 'cache'}",
            "data.size=[32,32]",
            "data.target_spacing=[3.0,3.0]",
        ],
        capsys,
    )
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "acdc.json" in err and "patient071" in err


def test_bad_input_writes_no_run_directory_and_a_failed_start_can_be_retried(
    tiny_config, tmp_path, stage_runs
):
    out = tmp_path / "local"
    with pytest.raises(InputError):
        run_pretrain_local(tiny_config(PretrainLocalRun, f"encoder={tmp_path / 'no'}"), out)
    assert not out.exists()
    # the corrected command (another config) starts in that directory without --fresh
    fixed = tiny_config(PretrainLocalRun, "optim.iterations=1", f"encoder={stage_runs[0]}")
    assert run_pretrain_local(fixed, out) == out


# ---- speed: what each device gets, compiled networks, other kernels and layouts -------------


def test_speed_defaults_follow_the_device(tiny_config, tmp_path):
    trainer = GlobalPretrainer(tiny_config(PretrainGlobalRun), tmp_path / "run", "cpu")
    assert trainer.channels_last and trainer.fused_adam and not trainer.autocast
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compile_by_default(cuda, COMPILE_MIN_ITERATIONS)
    assert not compile_by_default(cuda, COMPILE_MIN_ITERATIONS - 1)
    assert not compile_by_default(cpu, 10**6)


def test_speed_flags_reach_the_stage(tmp_path, monkeypatch):
    seen = {}

    def run(config, out, device, fresh, speed):
        seen["speed"] = speed

    monkeypatch.setattr(stages, "run_finetune", run)
    main(["finetune", "--out", str(tmp_path / "a"), "--no-compile"])
    assert seen["speed"] == Speed(compile=False)
    main(["finetune", "--out", str(tmp_path / "b"), "--sync-batchnorm"])
    assert seen["speed"] == Speed(sync_batchnorm=True)
    main(["finetune", "--out", str(tmp_path / "c")])
    assert seen["speed"] == Speed()


SPEED_STAGES = {
    "pretrain-global": (PretrainGlobalRun, run_pretrain_global, ("loss.volumes_per_batch=2",)),
    "pretrain-local": (PretrainLocalRun, run_pretrain_local, ("loss.strategy=LD",)),
    "finetune": (FinetuneRun, run_finetune, ("optim.batch_size=4", "finetune.val_every=2")),
}


def _weights(run_dir):
    return load_weights(run_dir / "weights.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("stage", SPEED_STAGES)
def test_compiled_networks_train_as_the_eager_ones(tiny_config, tmp_path, stage_runs, stage):
    """torch.compile traces each stage's network whole (the aot_eager backend compiles
    nothing, so the CPU test stays seconds); the weights match the eager run's."""
    run_class, run, extra = SPEED_STAGES[stage]
    if stage == "pretrain-local":
        extra = (*extra, f"encoder={stage_runs[0]}")
    config = tiny_config(run_class, "optim.iterations=3", *extra)
    eager = run(config, tmp_path / "eager", device="cpu")
    compiled = Speed(compile=True, compile_backend="aot_eager")
    traced = run(config, tmp_path / "compiled", device="cpu", speed=compiled)
    a, b = _weights(eager), _weights(traced)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_a_later_run_of_the_same_shapes_compiles_nothing_new(tiny_config, tmp_path):
    """What lets an experiment compile many short runs once (``compile_choices`` in
    contraseg.experiment.execute): dynamo guards on the shapes of the parameters, not on which
    tensors they are, so another run's new network (another seed, another labelled set) reuses
    the graphs of the first: augmentation, network and loss alike."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    speed = Speed(compile=True, compile_backend="aot_eager")
    base = ("optim.iterations=2", "optim.batch_size=4", "finetune.val_every=2")
    run_finetune(tiny_config(FinetuneRun, *base), tmp_path / "a", device="cpu", speed=speed)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 3  # the augmentation's, the network's and the loss's
    other = tiny_config(FinetuneRun, *base, "seed=1", "finetune.combination=c2")
    run_finetune(other, tmp_path / "b", device="cpu", speed=speed)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("on", [True, False])
def test_cudnn_benchmark_mode_holds_inside_training_steps_only(
    on, stage_runs, tiny_config, tmp_path, monkeypatch
):
    """Speed.cudnn_benchmark: on while a step computes its loss and gradients, as before
    outside it (validation's shapes vary with the volumes)."""
    speed = Speed(compile=False, cudnn_benchmark=on)
    trainer = built_trainer("finetune", stage_runs, tiny_config, tmp_path, "cpu", speed)
    seen = []
    compute_loss = trainer.compute_loss

    def recording(iteration):
        seen.append(torch.backends.cudnn.benchmark)
        return compute_loss(iteration)

    monkeypatch.setattr(trainer, "compute_loss", recording)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    trainer.train_step(1)
    assert seen == [on] and torch.backends.cudnn.benchmark is False


def test_a_compiler_failure_says_how_to_train_without_it(tiny_config, tmp_path):
    def failing_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    config = tiny_config(FinetuneRun, "optim.iterations=2", "optim.batch_size=2")
    speed = Speed(compile=True, compile_backend=failing_backend)
    with pytest.raises(TrainingError, match=r"torch.compile failed .*--no-compile$") as err:
        run_finetune(config, tmp_path / "run", device="cpu", speed=speed)
    assert "no compiler here" in str(err.value) and len(str(err.value).splitlines()) == 1
    run_finetune(config, tmp_path / "run", device="cpu", speed=Speed(compile=False))


def test_fused_adam_and_channels_last_resume_into_a_plain_run(tiny_config, tmp_path, monkeypatch):
    """Fused Adam and channels-last weights (the defaults): a checkpoint written with them
    resumes without them and ends near the run that kept them."""
    config = tiny_config(
        FinetuneRun,
        "optim.iterations=4",
        "optim.checkpoint_every=2",
        "optim.batch_size=4",
        "finetune.val_every=2",
    )
    fast = Speed(fused_adam=True, channels_last=True)
    straight = run_finetune(config, tmp_path / "straight", device="cpu", speed=fast)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, Finetuner, 3)
        with pytest.raises(KeyboardInterrupt):
            run_finetune(config, tmp_path / "resumed", device="cpu", speed=fast)
    plain = Speed(fused_adam=False, channels_last=False)
    trainer = Finetuner(config, tmp_path / "resumed", "cpu", plain)
    trainer.run()
    assert all(group["fused"] is None for group in trainer.optimizer.param_groups)
    a, b = _weights(straight), _weights(tmp_path / "resumed")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_run_agrees_with_eager_within_seed_noise(tiny_config, tmp_path):
    """On the GPU, 200 iterations compiled (inductor, CUDA graphs) follow the eager run of the
    same seed more closely than two eager runs of different seeds follow each other."""

    def losses(name: str, speed: Speed, seed: int) -> torch.Tensor:
        config = tiny_config(
            PretrainGlobalRun, "optim.iterations=200", "loss.volumes_per_batch=4", f"seed={seed}"
        )
        run_dir = run_pretrain_global(config, tmp_path / name, device="cuda", speed=speed)
        return torch.tensor([row["loss"] for row in _metrics(run_dir)])

    eager = losses("eager", Speed(compile=False), 0)
    compiled = losses("compiled", Speed(compile=True), 0)
    other_seed = losses("seed1", Speed(compile=False), 1)
    assert (compiled - eager).abs().mean() < (other_seed - eager).abs().mean()


STEP_CASES = [
    "global",
    "local",
    "local-transformed",
    "finetune",
    "finetune-mixup",
    "finetune-crop-jitter",
]


def built_trainer(case, stage_runs, tiny_config, run_dir, device, speed):
    """A trainer of one of STEP_CASES, built for ``train_step`` (10 iterations planned)."""
    global_dir, _ = stage_runs
    local = [f"encoder={global_dir}", "loss.strategy=LD", "loss.volumes_per_batch=2"]
    transformed = [*local, "loss.views=transformed"]
    cases = {
        "global": (GlobalPretrainer, PretrainGlobalRun, ["loss.volumes_per_batch=2"]),
        "local": (LocalPretrainer, PretrainLocalRun, local),
        "local-transformed": (LocalPretrainer, PretrainLocalRun, transformed),
        "finetune": (Finetuner, FinetuneRun, []),
        "finetune-mixup": (Finetuner, FinetuneRun, ["finetune.mixup_alpha=0.4"]),
        "finetune-crop-jitter": (
            Finetuner,
            FinetuneRun,
            ["augment.geometry=crop", "augment.brightness=0.1", "augment.contrast=[0.8,1.2]"],
        ),
    }
    trainer_class, run_class, overrides = cases[case]
    config = tiny_config(run_class, "optim.iterations=10", *overrides)
    trainer = trainer_class(config, run_dir, device, speed)
    trainer.build()
    return trainer


@pytest.mark.parametrize("stage", STEP_CASES)
def test_what_a_compiled_step_compiles_traces_whole(stage, stage_runs, tiny_config, tmp_path):
    """What a compiled run compiles (the augmentation's applier, the network and the loss)
    traces into one graph each: nothing in them reads a tensor's value, which would split the
    graph (and, on a GPU, wait for it). The aot_eager backend traces without generating code."""
    trainer = built_trainer(stage, stage_runs, tiny_config, tmp_path, "cpu", Speed(compile=False))
    torch._dynamo.reset()
    whole = functools.partial(torch.compile, backend="aot_eager", fullgraph=True)
    assert trainer.augment_fn is not None
    trainer.augment_fn = whole(trainer.augment_fn)
    trainer.net, trainer.loss_fn = whole(trainer.net), whole(trainer.loss_fn)
    for iteration in (1, 2):
        trainer.train_step(iteration)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stage", STEP_CASES)
def test_cuda_training_steps_never_wait_for_the_gpu(stage, stage_runs, tiny_config, tmp_path):
    """An eager step only queues work: no copy, read or check in it waits for the GPU, so the
    host runs ahead of the device (CUDA's sync debug mode raises at any synchronising call)."""
    trainer = built_trainer(stage, stage_runs, tiny_config, tmp_path, "cuda", Speed(compile=False))
    trainer.train_step(1)  # the first step finds the pairs and may wait
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for iteration in (2, 3):
            trainer.train_step(iteration)
    finally:
        torch.cuda.set_sync_debug_mode("default")
