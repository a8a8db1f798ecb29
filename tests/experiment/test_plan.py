"""Expanding a grid: shared pre-training, readable and stable names, dependencies, shards."""

from __future__ import annotations

import pytest

from contraseg.data.splits import generated_split
from contraseg.errors import InputError
from contraseg.experiment import expand, load_grid
from contraseg.experiment.execute import parse_devices, parse_shard, shard_runs
from contraseg.experiment.plan import variant_name

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
