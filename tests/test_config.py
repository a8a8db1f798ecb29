"""Typed configs: strict keys with suggestions, typed overrides, round trip through YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from contraseg.config import RUN_CLASSES as RUN_CLASS_OF
from contraseg.config import (
    FinetuneRun,
    PretrainGlobalRun,
    PretrainJointRun,
    PretrainLocalRun,
    PretrainPretextRun,
    load_config,
    parse_overrides,
    save_config,
)
from contraseg.errors import InputError


def test_defaults_without_file():
    config = load_config(PretrainGlobalRun)
    assert config.loss.strategy == "GD"
    assert config.model.widths == [16, 32, 64, 128, 128, 128]


def test_unknown_key_names_it_and_suggests_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  itrations: 5\n")
    with pytest.raises(InputError) as err:
        load_config(PretrainGlobalRun, path)
    assert str(path) in str(err.value)
    assert "'optim.itrations'" in str(err.value)
    assert "did you mean 'optim.iterations'" in str(err.value)


def test_unknown_section_is_an_error():
    with pytest.raises(InputError, match=r"unknown config key 'lossy'.*'loss'"):
        load_config(PretrainGlobalRun, overrides=["lossy.strategy=GR"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.strategy=GX", "must be one of"),
        ("optim.iterations=ten", "must be int"),
        ("optim.lr=[1]", "must be float"),
        ("model.widths=3", "must be a list"),
        ("optim.iterations", "key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(InputError, match=message):
        load_config(PretrainGlobalRun, overrides=[override])


def test_overrides_apply_over_the_file_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\n  iterations: 7\nloss:\n  strategy: GR\n")
    config = load_config(PretrainGlobalRun, path, ["optim.lr=3e-4", "model.widths=[4,8,8,8,8,8]"])
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.optim.iterations == 7  # from the file
    assert config.loss.strategy == "GR"
    assert config.model.widths == [4, 8, 8, 8, 8, 8]
    assert isinstance(load_config(PretrainGlobalRun, overrides=["optim.lr=1"]).optim.lr, float)


def test_optional_values_accept_null():
    config = load_config(FinetuneRun, overrides=["data.size=null", "data.target_spacing=[1.5,1.5]"])
    assert config.data.size is None
    assert config.data.target_spacing == [1.5, 1.5]


def test_saved_config_loads_back_identical(tmp_path):
    config = load_config(
        FinetuneRun, overrides=["finetune.init=encoder", "finetune.pretrained=runs/g", "seed=3"]
    )
    save_config(config, tmp_path / "config.yaml")
    assert load_config(FinetuneRun, tmp_path / "config.yaml") == config


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["a.b=1", "a.c=x", "d=true"]) == {"a": {"b": 1, "c": "x"}, "d": True}


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(PretrainGlobalRun, path)


# run configs of the stage commands; the experiment grids (src/contraseg/grids/demo*.yaml and
# configs/paper/grids/) are checked by tests/experiment/test_grid.py
CONFIGS = sorted(
    path
    for path in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")
    if "grids" not in path.parts and not path.name.startswith("demo")
)
RUN_CLASSES = {
    "pretrain_global": PretrainGlobalRun,
    "pretrain_local": PretrainLocalRun,
    "pretrain_joint": PretrainJointRun,
    "pretrain_pretext": PretrainPretextRun,
    "finetune": FinetuneRun,
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    (cls,) = [cls for stem, cls in RUN_CLASSES.items() if stem in path.name]
    load_config(cls, path)


def test_configs_are_shipped():
    assert len(CONFIGS) >= 12


@pytest.mark.parametrize("key", ["pseudo_threshold=0.5", "pseudo_fraction=0.25"])
def test_self_training_keys_need_self_training_rounds(key):
    with pytest.raises(InputError, match=rf"'finetune.{key.split('=')[0]}'.*self_training_rounds"):
        load_config(FinetuneRun, overrides=[f"finetune.{key}"])
    config = load_config(
        FinetuneRun, overrides=[f"finetune.{key}", "finetune.self_training_rounds=1"]
    )
    assert config.finetune.self_training_rounds == 1


@pytest.mark.parametrize(
    ("task", "key", "used_by"),
    [
        ("rotation", "boxes=2", "inpainting"),
        ("rotation", "decoder_blocks=3", "inpainting and context_restoration"),
        ("inpainting", "swaps=3", "context_restoration"),
        ("context_restoration", "box_fraction=[0.1,0.2]", "inpainting"),
    ],
)
def test_pretext_keys_of_another_task_are_refused(task, key, used_by):
    overrides = [f"pretext.task={task}", f"pretext.{key}"]
    with pytest.raises(InputError, match=rf"'pretext.{key.split('=')[0]}'.*task {used_by}$"):
        load_config(PretrainPretextRun, overrides=overrides)


def test_new_run_classes_are_commands():
    assert RUN_CLASS_OF["pretrain-joint"] is PretrainJointRun
    assert RUN_CLASS_OF["pretrain-pretext"] is PretrainPretextRun
    assert load_config(PretrainJointRun, overrides=["lambda_local=100"]).lambda_local == 100.0
    with pytest.raises(InputError, match="lambda_local"):
        load_config(PretrainJointRun, overrides=["lambda_local=-1"])
