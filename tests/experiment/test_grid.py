"""Grid files: strict keys with suggestions, merged layers, and every shipped grid expands."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import reader_kit
import yaml

from contraseg.cli import main
from contraseg.config import FinetuneRun, PretrainGlobalRun, PretrainLocalRun, load_config
from contraseg.data.readers import get_reader
from contraseg.data.splits import generated_split, get_split
from contraseg.demo import demo_grid
from contraseg.errors import InputError
from contraseg.experiment import expand, load_grid

REPO = Path(__file__).resolve().parents[2]
GRIDS = REPO / "configs" / "paper" / "grids"
DATASETS = ("acdc", "prostate", "mmwhs")
TABLES = {
    "table1": DATASETS,
    "table2_batch": ("acdc",),
    "table3_partitions": ("acdc",),
    "table4_decoder": ("acdc",),
    "table5_region": ("prostate", "mmwhs"),
    "table6_strategies": DATASETS,
    "table7_joint": ("acdc",),
    "table8_mixup": DATASETS,
    "baselines": DATASETS,
    "local_views": DATASETS,
}


def _write(tmp_path: Path, text: str, name: str = "g.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "initialisation: []\n",
            "unknown config key 'initialisation' (did you mean 'initialisations'?)",
        ),
        (
            "pretrain_global: {loss: {stratgy: GR}}\n",
            "unknown config key 'pretrain_global.loss.stratgy' (did you mean "
            "'pretrain_global.loss.strategy'?)",
        ),
        ("finetune: {seed: 3}\n", "'finetune.seed' is set by seeds"),
        (
            "finetune: {finetune: {init: encoder}}\n",
            "'finetune.finetune.init' is set by initialisations",
        ),
        (
            "pretrain_global: {data: {n4: true}}\n",
            "'pretrain_global.data.n4' is set by the grid's top-level data",
        ),
        ("pretrain_local: {encoder: /x}\n", "'pretrain_local.encoder' is set by the stage-1 run"),
        ("labelled_volumes: [1, 3]\n", "'labelled_volumes[1]' must be one of 1 | 2 | 8 | 'all'"),
        ("seeds: [0, 0]\n", "'seeds' has repeated values"),
        ("baseline: none\n", "'baseline': 'none' is not an initialisation"),
        ("phantom: {volumes: 30}\ndata: {dataset: acdc}\n", "applies only to data.dataset phantom"),
        (
            "initialisations: [{name: a, pretrain_local: {}}]\nbaseline: a\n",
            "'initialisations[0].pretrain_local': needs pretrain_global",
        ),
        (
            "initialisations: [{name: random}, "
            "{name: x, pretrain_global: {loss: {strategy: GX}}}]\n",
            "'initialisations[1].pretrain_global.loss.strategy' must be one of",
        ),
        (
            "initialisations: [{name: random}, "
            "{name: x, pretrain_pretext: {pretext: {task: jigsaw}}}]\n",
            "'initialisations[1].pretrain_pretext.pretext.task' must be one of 'rotation' | "
            "'inpainting' | 'context_restoration', got 'jigsaw'",
        ),
        (
            "initialisations: [{name: random}, "
            "{name: x, pretrain_global: {}, pretrain_joint: {}}]\n",
            "'initialisations[1]': give one of pretrain_global, pretrain_joint, "
            "pretrain_pretext, not pretrain_global and pretrain_joint",
        ),
        (
            "initialisations: [{name: random}, "
            "{name: x, pretrain_joint: {}, pretrain_local: {}}]\n",
            "'initialisations[1].pretrain_local': needs pretrain_global",
        ),
        (
            "initialisations: [{name: random}, {name: x, finetune: {finetune: {combination: c2}}}]"
            "\n",
            "'initialisations[1].finetune.finetune.combination' is set by combinations",
        ),
        (
            "initialisations: [{name: random}, {name: x, finetune: {seed: 4}}]\n",
            "'initialisations[1].finetune.seed' is set by seeds",
        ),
        (
            "initialisations: [{name: random}, "
            "{name: x, pretrain_global: {}, finetune: {finetune: {pretrained: /r}}}]\n",
            "'initialisations[1].finetune.finetune.pretrained' is set by initialisations",
        ),
        (
            "initialisations: [{name: random}, {name: x, finetune: {data: {size: [64, 64]}}}]\n",
            "'initialisations[1].finetune.data.size' is set by the grid's top-level data",
        ),
        (
            "initialisations: [{name: random}, {name: x, finetune: {finetune: {mixup: 0.1}}}]\n",
            "unknown config key 'initialisations[1].finetune.finetune.mixup' (did you mean "
            "'initialisations[1].finetune.finetune.mixup_alpha'?)",
        ),
        (
            "initialisations: [{name: random, load: encoder}]\n",
            "'initialisations[0].load': random initialisation loads nothing",
        ),
        (
            "initialisations: [{name: random}, {name: x, pretrain_global: {}, load: decoder}]\n",
            "'initialisations[1].load' must be one of 'encoder' | 'encoder+decoder'",
        ),
        (
            "initialisations: [{name: random}, "
            "{name: x, pretrain_pretext: {}, load: encoder+decoder}]\n",
            "'initialisations[1].load': encoder+decoder needs a pre-training that trains "
            "decoder blocks",
        ),
        (
            "pretrain_pretext: {pretext: {task: rotation}}\n"
            "initialisations: [{name: random}, "
            "{name: x, pretrain_global: {}, load: encoder+decoder}]\n",
            "'initialisations[1].load': encoder+decoder needs",
        ),
    ],
)
def test_bad_grids_name_the_file_and_the_key(tmp_path, text, message):
    base = "initialisations: [{name: random}]\n"
    path = _write(tmp_path, text if "initialisations" in text else base + text)
    with pytest.raises(InputError) as err:
        load_grid([path])
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_later_files_and_overrides_win(tmp_path):
    first = _write(
        tmp_path,
        "data: {dataset: acdc, root: /a, n4: true}\nseeds: [0, 1]\n"
        "pretrain_global: {optim: {iterations: 7, lr: 0.01}}\n"
        "initialisations: [{name: random}]\n",
        "first.yaml",
    )
    second = _write(tmp_path, "pretrain_global: {optim: {iterations: 9}}\n", "second.yaml")
    grid = load_grid([first, second], ["seeds=[3]", "data.root=/b"])
    assert grid.pretrain_global == {"optim": {"iterations": 9, "lr": 0.01}}
    assert grid.seeds == [3]
    assert grid.data.root == "/b"
    assert grid.data.n4 is True


def test_the_cli_prints_one_line_for_a_bad_grid(tmp_path, capsys):
    path = _write(tmp_path, "initialisations: [{name: random}]\nseeds: [-1]\n")
    assert main(["experiment", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'seeds[0]' must lie in" in err
    assert not (tmp_path / "o").exists()


def _split(grid):
    if grid.data.dataset in DATASETS:
        return get_split(grid.data.dataset, [])
    volumes = grid.phantom.volumes
    return generated_split([f"patient{i:03d}" for i in range(1, volumes + 1)], 0)


@pytest.mark.parametrize(
    ("table", "dataset"), [(t, d) for t, datasets in TABLES.items() for d in datasets]
)
def test_every_paper_grid_expands_on_its_dataset_and_at_tiny_size(table, dataset, tmp_path):
    files = [GRIDS / f"{dataset}.yaml", GRIDS / f"{table}.yaml"]
    grid = load_grid(files, ["data.root=/data"])
    plan = expand(grid, tmp_path, _split(grid))
    pretraining = [r for r in plan.runs if r.stage != "finetune"]
    finetuning = plan.level("finetune")
    assert len(finetuning) == len(grid.initialisations) * len(grid.seeds) * sum(
        1 if n == "all" else len(plan.split.combinations(n)) for n in grid.labelled_volumes
    )
    assert all(r.iterations == 10000 for r in plan.runs)
    gd = [r for r in pretraining if r.name.startswith("pretrain-global/GD")]
    assert all(
        2 * r.config.loss.volumes_per_batch * r.config.loss.partitions in (36, 40, 42, 248, 416)
        for r in gd
    )

    tiny = load_grid([*files, GRIDS / "tiny.yaml"])
    tiny_plan = expand(tiny, tmp_path, _split(tiny))
    assert tiny.data.dataset == "phantom" and tiny.data.root == ""
    assert [r.name for r in tiny_plan.runs if r.stage != "finetune"] == [
        r.name for r in pretraining
    ]
    assert all(r.iterations == 2 for r in tiny_plan.runs)


def test_table1_on_acdc_has_the_papers_runs(tmp_path):
    grid = load_grid([GRIDS / "acdc.yaml", GRIDS / "table1.yaml"])
    plan = expand(grid, tmp_path, _split(grid))
    assert [r.name for r in plan.runs if r.stage != "finetune"] == [
        "pretrain-global/GR",
        "pretrain-global/GD",
        "pretrain-local/GR+LR",
        "pretrain-local/GD+LR",
        "pretrain-local/GD+LD",
    ]
    local = plan.run("pretrain-local/GD+LD").config
    assert (local.loss.decoder_blocks, local.loss.region_size) == (3, 3)
    gd = plan.run("pretrain-global/GD").config
    assert (gd.loss.volumes_per_batch, gd.loss.partitions) == (5, 4)  # a batch of 40
    # 6 initialisations x (5 + 5 + 3 sets + the benchmark) x 2 seeds
    assert len(plan.level("finetune")) == 6 * 14 * 2
    benchmark = plan.run("finetune/GD+LR/all-s1").config
    assert benchmark.finetune.labelled_volumes == "all"
    assert benchmark.finetune.pretrained == str(tmp_path / "pretrain-local/GD+LR")


def _pretraining(plan) -> list[str]:
    return [r.name for r in plan.runs if r.stage != "finetune"]


def _folders(plan) -> dict[str, str]:
    """Initialisation -> its fine-tuning folder."""
    return {r.init: r.name.split("/")[1] for r in plan.level("finetune")}


def test_table7_compares_joint_runs_with_the_stagewise_method(tmp_path):
    grid = load_grid([GRIDS / "acdc.yaml", GRIDS / "table7_joint.yaml"])
    plan = expand(grid, tmp_path, _split(grid))
    lambdas = (1, 10, 100, 1000)
    assert _pretraining(plan) == [
        "pretrain-global/GD",
        *(f"pretrain-joint/GD+LD-lambda{v}" for v in lambdas),
        "pretrain-local/GD+LD",
    ]
    stagewise = plan.run("pretrain-local/GD+LD").config
    for value in lambdas:
        joint = plan.run(f"pretrain-joint/GD+LD-lambda{value}").config
        assert joint.lambda_local == value
        assert joint.local_loss == stagewise.loss  # the same local loss, batch and depth
        assert joint.global_loss == plan.run("pretrain-global/GD").config.loss
        run = plan.run(f"finetune/joint-GD+LD-lambda{value}/2vol-c5-s1")
        assert run.config.finetune.init == "encoder+decoder"
        assert run.needs == (f"pretrain-joint/GD+LD-lambda{value}",)
    assert grid.baseline == "G^D + L^D"
    assert len(plan.level("finetune")) == 5 * 10 * 2


def test_table8_adds_mixup_to_the_same_pretraining_and_pairs(tmp_path):
    grid = load_grid([GRIDS / "prostate.yaml", GRIDS / "table8_mixup.yaml"])
    plan = expand(grid, tmp_path, _split(grid))
    assert _pretraining(plan) == ["pretrain-global/GD", "pretrain-local/GD+LD"]
    assert _folders(plan) == {
        "random": "random",
        "random + Mixup": "random+mixup0.1",
        "G^D + L^D": "GD+LD",
        "G^D + L^D + Mixup": "GD+LD+mixup0.1",
    }
    runs = plan.level("finetune")
    for run in runs:
        assert run.config.finetune.mixup_alpha == (0.1 if "Mixup" in run.init else 0.0)
        assert run.keys["finetune.finetune.mixup_alpha"] == run.config.finetune.mixup_alpha
    mixed = plan.run("finetune/GD+LD+mixup0.1/8vol-c3-s0").config
    plain = plan.run("finetune/GD+LD/8vol-c3-s0").config
    assert dataclasses.replace(mixed.finetune, mixup_alpha=0.0) == plain.finetune
    pairs = [
        {(r.labelled_volumes, r.combination, r.seed) for r in runs if r.init == init}
        for init in _folders(plan)
    ]
    assert all(p == pairs[0] for p in pairs) and len(pairs[0]) == 13 * 2


def test_baselines_load_what_each_pretext_task_trains(tmp_path):
    grid = load_grid([GRIDS / "mmwhs.yaml", GRIDS / "baselines.yaml"])
    plan = expand(grid, tmp_path, _split(grid))
    assert _pretraining(plan) == [
        "pretrain-global/GD",
        "pretrain-pretext/rotation-b10",
        "pretrain-pretext/inpainting",
        "pretrain-pretext/context_restoration",
        "pretrain-local/GD+LD",
    ]
    loads = {r.init: r.config.finetune.init for r in plan.level("finetune")}
    assert loads == {
        "random": "random",
        "rotation": "encoder",
        "inpainting": "encoder+decoder",
        "context restoration": "encoder+decoder",
        "G^D + L^D": "encoder+decoder",
    }
    # 40 images per iteration: 10 slices in 4 rotations, 40 slices to restore
    batches = {
        r.config.pretext.task: r.config.optim.batch_size for r in plan.level("pretrain-pretext")
    }
    assert batches == {"rotation": 10, "inpainting": 40, "context_restoration": 40}


def test_local_views_on_the_phantom_layer_are_the_documented_runs(tmp_path):
    files = [GRIDS / "phantom.yaml", GRIDS / "local_views.yaml"]
    grid = load_grid(files, ["combinations=[c1,c2,c3]", "phantom.preset=easy"])
    plan = expand(grid, tmp_path, _split(grid))
    assert _pretraining(plan) == [
        "pretrain-global/GD",
        "pretrain-local/GD+LD-views-aligned",
        "pretrain-local/GD+LD-views-transformed",
    ]
    assert [plan.run(n).iterations for n in _pretraining(plan)] == [1200, 300, 300]
    assert [r.config.loss.views for r in plan.level("pretrain-local")] == [
        "aligned",
        "transformed",
    ]
    assert grid.baseline == "G^D" and len(plan.level("finetune")) == 3 * 6 * 2
    assert {r.iterations for r in plan.level("finetune")} == {200}


def test_the_cityscapes_grid_expands_on_a_cityscapes_layout(tmp_path):
    root = reader_kit.write_cityscapes(tmp_path / "cityscapes", per_city=3)  # 9 images
    grid = load_grid([GRIDS / "cityscapes.yaml"], [f"data.root={root}"])
    split = get_reader(grid.data).split(grid.data.split_seed)
    plan = expand(grid, tmp_path / "out", split)
    assert _pretraining(plan) == ["pretrain-global/GR", "pretrain-local/GR+LR"]
    assert _folders(plan) == {
        "random": "random",
        "G^R": "GR",
        "G^R + L^R": "GR+LR",
        "G^R + L^R + Mixup": "GR+LR+mixup0.1",
    }
    # 4 initialisations x (3 draws of 3 sizes + the benchmark) x 2 seeds
    assert len(plan.level("finetune")) == 4 * 10 * 2
    stage1 = plan.run("pretrain-global/GR").config
    assert 2 * stage1.loss.volumes_per_batch == 80 and stage1.augment.crop_shape == "aspect"
    assert plan.run("pretrain-local/GR+LR").config.optim.batch_size == 40
    for run in plan.level("finetune"):
        assert run.config.data.dataset == "cityscapes"
        assert run.config.augment.geometry == "crop" and run.config.augment.hue == 0.05
        assert run.config.finetune.mixup_alpha == (0.1 if "Mixup" in run.init else 0.0)
    assert all(r.iterations == 10000 for r in plan.runs)
    # the settings of the stage configs that docs/training.md gives for running it by hand
    paper = REPO / "configs" / "paper"
    for name, cls, stage, keys in (
        ("pretrain_global_GR", PretrainGlobalRun, "pretrain-global", ("loss", "augment", "optim")),
        ("pretrain_local_LR_d3", PretrainLocalRun, "pretrain-local", ("loss", "augment", "optim")),
        ("finetune", FinetuneRun, "finetune", ("augment", "optim")),
    ):
        config = load_config(cls, paper / f"cityscapes_{name}.yaml", [f"data.root={root}"])
        run = plan.level(stage)[0]
        assert all(getattr(config, k) == getattr(run.config, k) for k in keys), name
        assert config.data == run.config.data
    finetune = plan.run("finetune/GR+LR/1vol-c1-s0").config.finetune
    assert (finetune.loss, finetune.val_every) == (config.finetune.loss, config.finetune.val_every)


@pytest.mark.parametrize("name", ["demo.yaml", "demo_quick.yaml"])
def test_the_demo_grids_compare_every_initialisation_in_pairs(name, tmp_path):
    grid = load_grid([demo_grid(name == "demo_quick.yaml")])
    plan = expand(grid, tmp_path, _split(grid))
    assert [i.name for i in grid.initialisations] == ["random", "G^R", "G^D", "G^D + L^D"]
    assert grid.labelled_volumes == [1, 2]
    runs = plan.level("finetune")
    cells = {(r.init, r.labelled_volumes) for r in runs}
    pairs = {
        cell: {(r.combination, r.seed) for r in runs if (r.init, r.labelled_volumes) == cell}
        for cell in cells
    }
    assert len({frozenset(p) for p in pairs.values()}) == 1  # the same sets and seeds everywhere
    if name == "demo.yaml":
        assert len(next(iter(pairs.values()))) >= 6  # the least for p < 0.05


def test_grid_yaml_records_the_resolved_grid(tmp_path):
    from contraseg.experiment.grid import grid_text

    grid = load_grid([demo_grid()], ["data.size=[64,64]"])
    path = _write(tmp_path, grid_text(grid), "grid.yaml")
    assert yaml.safe_load(path.read_text())["data"]["size"] == [64, 64]
    assert load_grid([path]) == grid
