"""Expanding a grid: shared pre-training, readable and stable names, dependencies, shards."""

from __future__ import annotations

import pytest
import torch

from contraseg.data.splits import generated_split
from contraseg.errors import InputError
from contraseg.experiment import expand, load_grid
from contraseg.experiment.execute import (
    compile_choices,
    parse_devices,
    parse_shard,
    shard_runs,
)
from contraseg.experiment.plan import LEVELS, variant_name
from contraseg.training.trainer import COMPILE_MIN_ITERATIONS

SPLIT = generated_split([f"patient{i:03d}" for i in range(1, 25)], 0)


def _plan(tiny_grid, tmp_path, **changes):
    return expand(load_grid([tiny_grid(**changes)]), tmp_path / "out", SPLIT)


def test_each_pretraining_runs_once_and_is_shared(tiny_grid, tmp_path):
    plan = _plan(tiny_grid, tmp_path, combinations=["c1", "c2"], seeds=[0, 1])
    names = [r.name for r in plan.runs if r.stage != "finetune"]
    # G^D and G^D + L^D share one stage-1 run
    assert names == ["pretrain-global/GR", "pretrain-global/GD", "pretrain-local/GD+LD"]
    assert plan.run("pretrain-local/GD+LD").needs == ("pretrain-global/GD",)
    assert plan.run("pretrain-local/GD+LD").config.encoder == str(
        tmp_path / "out" / "pretrain-global/GD"
    )
    ft = plan.run("finetune/GD+LD/2vol-c2-s1")
    assert ft.needs == ("pretrain-local/GD+LD",)
    assert (ft.config.finetune.init, ft.config.seed) == ("encoder+decoder", 1)
    assert ft.config.finetune.pretrained == str(tmp_path / "out" / "pretrain-local/GD+LD")
    assert plan.run("finetune/GD/1vol-c1-s0").config.finetune.init == "encoder"
    assert plan.run("finetune/random/1vol-c1-s0").needs == ()
    assert len(plan.level("finetune")) == 4 * 2 * 2 * 2
    # complete pairs first: seed, then labelled volumes, set, initialisation
    first = [(r.seed, r.labelled_volumes, r.combination) for r in plan.level("finetune")[:4]]
    assert first == [(0, 1, "c1")] * 4
    assert [r.name for r in plan.dependents("pretrain-global/GD")] == [
        "pretrain-local/GD+LD",
        *(r.name for r in plan.level("finetune") if r.init in ("G^D", "G^D + L^D")),
    ]


def test_names_come_from_what_differs_and_do_not_move(tiny_grid, tmp_path):
    inits = [
        {"name": "random"},
        {"name": "a", "pretrain_global": {"loss": {"volumes_per_batch": 3}}},
        {
            "name": "b",
            "pretrain_global": {"loss": {"volumes_per_batch": 3}},
            "pretrain_local": {"loss": {"decoder_blocks": 1, "region_size": 1}},
        },
    ]
    plan = _plan(tiny_grid, tmp_path, initialisations=inits, labelled_volumes=[1, "all"])
    assert [r.name for r in plan.runs if r.stage != "finetune"] == [
        "pretrain-global/GD-m3",
        "pretrain-local/GD-m3+LD-d1-K1",
    ]
    assert "finetune/GD-m3+LD-d1-K1/all-s0" in {r.name for r in plan.runs}
    grown = _plan(
        tiny_grid,
        tmp_path,
        initialisations=[*inits, {"name": "c", "pretrain_global": {"loss": {"strategy": "GR"}}}],
        labelled_volumes=[1, "all"],
    )
    assert {r.name for r in plan.runs} < {r.name for r in grown.runs}
    assert variant_name("GD", {"loss": {"temperature": 0.5}, "model": {"g2_project": False}}) == (
        "GD-tau0.5-g2_project-off"
    )


def test_grid_keys_of_a_run(tiny_grid, tmp_path):
    plan = _plan(tiny_grid, tmp_path)
    keys = {r.init: r.keys for r in plan.level("finetune")}
    assert keys["G^R"] == {
        "pretrained": "pretrain-global/GR",
        "pretrain_global.loss.strategy": "GR",
    }
    assert keys["G^D + L^D"]["pretrain_global.loss.strategy"] == "GD"
    assert keys["random"] == {"pretrained": "", "pretrain_global.loss.strategy": None}


def test_two_initialisations_with_one_pretraining_are_refused(tiny_grid, tmp_path):
    inits = [
        {"name": "random"},
        {"name": "x", "pretrain_global": {}},
        {"name": "y", "pretrain_global": {"loss": {"strategy": "GD"}}},
    ]
    with pytest.raises(InputError, match="'x' and 'y' fine-tune from the same pre-training"):
        _plan(tiny_grid, tmp_path, initialisations=inits)


def test_sets_the_split_lacks_are_named(tiny_grid, tmp_path):
    with pytest.raises(InputError, match="no set c9 of 1 volumes"):
        _plan(tiny_grid, tmp_path, combinations=["c1", "c9"])


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_split_every_level_without_overlap(tiny_grid, tmp_path, count):
    plan = _plan(tiny_grid, tmp_path, combinations=["c1", "c2", "c3"])
    shards = [shard_runs(plan, (i, count), None) for i in range(count)]
    names = [r.name for shard in shards for r in shard]
    assert sorted(names) == sorted(r.name for r in plan.runs)
    for stage in ("pretrain-global", "finetune"):
        sizes = [sum(r.stage == stage for r in shard) for shard in shards]
        assert max(sizes) - min(sizes) <= 1  # each level spread evenly
    only = shard_runs(plan, (0, 1), "pretrain-local")
    assert [r.name for r in only] == ["pretrain-local/GD+LD"]


@pytest.mark.parametrize(
    ("text", "ok"), [("0/2", True), ("1/2", True), ("2/2", False), ("a/2", False), ("1", False)]
)
def test_shard_syntax(text, ok):
    if ok:
        assert parse_shard(text) == tuple(map(int, text.split("/")))
    else:
        with pytest.raises(InputError, match="--shard"):
            parse_shard(text)


def test_devices_give_one_worker_each():
    gpus = parse_devices("0,1,3")
    assert [(s.device, dict(s.env)) for s in gpus] == [
        ("cuda", {"CUDA_VISIBLE_DEVICES": str(i)}) for i in (0, 1, 3)
    ]
    assert [s.device for s in parse_devices("cpu,cpu")] == ["cpu", "cpu"]
    for bad in ("cuda:0", "0,,1", "gpu"):
        with pytest.raises(InputError, match="--devices"):
            parse_devices(bad)


def test_joint_pretext_and_finetune_keys_name_their_runs(tiny_grid, tmp_path):
    inits = [
        {"name": "random"},
        {"name": "random + self-training", "finetune": {"finetune": {"self_training_rounds": 2}}},
        {"name": "joint", "pretrain_joint": {"lambda_local": 10}},
        {"name": "joint, e", "pretrain_joint": {"lambda_local": 10.0}, "load": "encoder"},
        {
            "name": "joint + Mixup",
            "pretrain_joint": {"lambda_local": 10},
            "finetune": {"finetune": {"mixup_alpha": 0.2}},
        },
        {"name": "rotation", "pretrain_pretext": {}},
        {
            "name": "inpainting d_3",
            "pretrain_pretext": {"pretext": {"task": "inpainting", "decoder_blocks": 3}},
        },
        {"name": "G^D + L^D", "pretrain_global": {}, "pretrain_local": {}},
    ]
    plan = _plan(tiny_grid, tmp_path, initialisations=inits)
    # one joint run for the three initialisations that ask for it
    assert [r.name for r in plan.runs if r.stage != "finetune"] == [
        "pretrain-global/GD",
        "pretrain-joint/GD+LR-lambda10",
        "pretrain-pretext/rotation",
        "pretrain-pretext/inpainting-d3",
        "pretrain-local/GD+LD",
    ]
    first = {r.init: r for r in plan.level("finetune") if (r.labelled_volumes, r.seed) == (1, 0)}
    assert {i: (r.name, r.config.finetune.init) for i, r in first.items()} == {
        "random": ("finetune/random/1vol-c1-s0", "random"),
        "random + self-training": ("finetune/random+self2/1vol-c1-s0", "random"),
        "joint": ("finetune/joint-GD+LR-lambda10/1vol-c1-s0", "encoder+decoder"),
        "joint, e": ("finetune/joint-GD+LR-lambda10-enc/1vol-c1-s0", "encoder"),
        "joint + Mixup": ("finetune/joint-GD+LR-lambda10+mixup0.2/1vol-c1-s0", "encoder+decoder"),
        "rotation": ("finetune/rotation/1vol-c1-s0", "encoder"),
        "inpainting d_3": ("finetune/inpainting-d3/1vol-c1-s0", "encoder+decoder"),
        "G^D + L^D": ("finetune/GD+LD/1vol-c1-s0", "encoder+decoder"),
    }
    joint = first["joint + Mixup"]
    assert joint.needs == ("pretrain-joint/GD+LR-lambda10",)
    assert joint.config.finetune.pretrained == str(tmp_path / "out/pretrain-joint/GD+LR-lambda10")
    assert (joint.config.finetune.mixup_alpha, first["joint"].config.finetune.mixup_alpha) == (
        0.2,
        0.0,
    )
    # the grid's fine-tuning settings stay under the initialisation's own keys
    assert joint.config.optim.iterations == 4 and joint.config.finetune.val_every == 2
    # a self-training run trains once per round
    assert first["random + self-training"].iterations == 3 * first["random"].iterations
    assert first["inpainting d_3"].keys == {
        "pretrained": "pretrain-pretext/inpainting-d3",
        "finetune.finetune.init": "encoder+decoder",
        "finetune.finetune.mixup_alpha": 0.0,
        "finetune.finetune.self_training_rounds": 0,
        "pretrain_joint.lambda_local": None,
        "pretrain_pretext.pretext.decoder_blocks": 3,
        "pretrain_pretext.pretext.task": "inpainting",
    }
    assert first["rotation"].keys["pretrain_pretext.pretext.task"] == "rotation"
    assert first["random + self-training"].keys["finetune.finetune.self_training_rounds"] == 2
    # the levels run in order: stage 1, joint and pretext, stage 2, fine-tuning
    assert LEVELS == (
        "pretrain-global",
        "pretrain-joint",
        "pretrain-pretext",
        "pretrain-local",
        "finetune",
    )
    assert [r.name for r in shard_runs(plan, (1, 2), "pretrain-pretext")] == [
        "pretrain-pretext/inpainting-d3"
    ]


def test_a_joint_run_whose_keys_break_its_rules_names_the_initialisation(tiny_grid, tmp_path):
    inits = [
        {"name": "random"},
        {"name": "j", "pretrain_joint": {"local_loss": {"views": "transformed"}}},
    ]
    with pytest.raises(InputError, match=r"initialisations\[1\], j.*local_loss.views"):
        _plan(tiny_grid, tmp_path, initialisations=inits)


def test_the_command_line_offers_every_level():
    from contraseg.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    level = next(a for a in sub.choices["experiment"]._actions if a.dest == "level")
    assert tuple(level.choices) == LEVELS


def test_runs_of_one_shape_repay_one_compilation_together(tiny_grid, tmp_path):
    """On CUDA a process compiles the fine-tunings when all of them together train long enough
    to repay it, though each alone is too short; runs of another shape or augmentation count
    apart, the CPU never compiles, and --no-compile compiles nothing."""
    each = COMPILE_MIN_ITERATIONS // 4 + 1  # 8 fine-tunings of this: twice the threshold
    finetune = {"finetune": {"val_every": 2}, "optim": {"iterations": each, "batch_size": 4}}
    plan = _plan(tiny_grid, tmp_path, finetune=finetune)
    cuda = compile_choices(plan.runs, torch.device("cuda"))
    assert len(plan.level("finetune")) == 8
    assert all(cuda[r.name].compile for r in plan.level("finetune"))
    assert not any(cuda[r.name].compile for r in plan.runs if r.stage != "finetune")
    half = plan.level("finetune")[:4]  # 4 x ``each`` is just above the threshold
    assert all(compile_choices(half, torch.device("cuda"))[r.name].compile for r in half)
    assert not compile_choices(half[:3], torch.device("cuda"))[half[0].name].compile
    wider = _plan(
        tiny_grid, tmp_path, finetune={**finetune, "optim": {"iterations": each, "batch_size": 8}}
    )
    mixed = [*half[:2], *wider.level("finetune")[:2]]  # two shapes, neither repays it alone
    assert not any(s.compile for s in compile_choices(mixed, torch.device("cuda")).values())
    cropped = _plan(tiny_grid, tmp_path, finetune={**finetune, "augment": {"geometry": "crop"}})
    mixed = [*half[:2], *cropped.level("finetune")[:2]]  # another compiled augmentation
    assert not any(s.compile for s in compile_choices(mixed, torch.device("cuda")).values())
    assert not any(s.compile for s in compile_choices(plan.runs, torch.device("cpu")).values())
    never = compile_choices(plan.runs, torch.device("cuda"), no_compile=True)
    assert not any(s.compile for s in never.values())
