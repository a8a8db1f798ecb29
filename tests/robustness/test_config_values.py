"""Every config value is checked at load, before a run directory exists (docs/reliability.md).

The hand-made cases are the hardening issue's list; the hypothesis case throws random values at
random keys of every command and requires either a valid config or a one-line error, and never
a run directory.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contraseg.config import RUN_CLASSES, describe, load_config
from contraseg.errors import InputError

BAD_VALUES = [
    ("pretrain-global", "optim.checkpoint_every=0", "optim.checkpoint_every"),
    ("pretrain-global", "optim.log_every=0", "optim.log_every"),
    ("finetune", "finetune.val_every=0", "finetune.val_every"),
    ("pretrain-global", "loss.temperature=0", "loss.temperature"),
    ("pretrain-global", "loss.temperature=-0.1", "loss.temperature"),
    ("pretrain-global", "loss.temperature=.nan", "loss.temperature"),
    ("pretrain-global", "loss.temperature=.inf", "loss.temperature"),
    ("pretrain-global", "optim.iterations=0", "optim.iterations"),
    ("pretrain-global", "optim.iterations=-5", "optim.iterations"),
    ("pretrain-global", "optim.lr=-1e-3", "optim.lr"),
    ("pretrain-global", "optim.lr=.nan", "optim.lr"),
    ("pretrain-global", "model.widths=[16,32,64]", "model.widths"),
    ("pretrain-global", "augment.crop_fraction=[0,0]", "augment.crop_fraction"),
    ("pretrain-global", "augment.contrast=[2,1]", "augment.contrast"),
    ("pretrain-global", "augment.clip=[1,0]", "augment.clip"),
    ("finetune", "augment.scale=[]", "augment.scale"),
    ("finetune", "seed=-1", "seed"),
    ("finetune", "data.target_spacing=[.nan,1]", "data.target_spacing"),
    ("finetune", "data.target_spacing=.inf", "data.target_spacing"),
    ("finetune", "data.size=[100000,100000]", "data.size"),
    ("finetune", "data.size=[100,100]", "data.size"),
    ("finetune", "optim.batch_size=0", "optim.batch_size"),
    ("finetune", "optim.batch_size=10000000", "optim.batch_size"),
    ("pretrain-global", "loss.volumes_per_batch=0", "loss.volumes_per_batch"),
    ("pretrain-global", "optim.iterations=9223372036854775808", "optim.iterations"),
    ("pretrain-global", "seed=99999999999999999999999", "seed"),
    ("finetune", "model.num_classes=1", "model.num_classes"),
    ("finetune", "finetune.init=encoder", "finetune.pretrained"),
    ("finetune", "finetune.train=[patient001]", "finetune.val"),
    ("pretrain-local", "loss.decoder_blocks=6", "loss.decoder_blocks"),
    ("pretrain-local", "optim.iterations=3", "encoder"),
    ("finetune", "data.dataset=nnunet data.frames=[ES]", "data.frames"),
    ("finetune", "data.percentiles=[99,1]", "data.percentiles"),
    ("finetune", "data.normalise_mask=brain", "data.normalise_mask"),
]


@pytest.mark.parametrize(("command", "override", "key"), BAD_VALUES)
def test_a_bad_value_is_one_line_naming_the_key_and_no_run_directory(
    sandbox, run_cli, command, override, key
) -> None:
    check = sandbox.watch()
    out = sandbox.root / "run"
    err = run_cli(command, "--out", out, *override.split()).err
    assert f"'{key}" in err, err
    assert not out.exists()
    check()


@pytest.mark.parametrize("command", ["pretrain-global", "finetune"])
def test_a_bad_value_in_a_yaml_file_names_the_file(sandbox, run_cli, command) -> None:
    path = sandbox.root / "bad.yaml"
    path.write_text("optim:\n  lr: .nan\n")
    check = sandbox.watch()
    err = run_cli(command, "--config", path, "--out", sandbox.root / "run").err
    assert str(path) in err and "'optim.lr'" in err
    check()


def _keys() -> list[tuple[str, str]]:
    return [(command, key) for command, cls in RUN_CLASSES.items() for key, *_ in describe(cls)]


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=3)), max_size=7),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(item=st.sampled_from(_keys()), value=VALUES)
def test_random_values_load_valid_or_fail_with_one_line(item, value) -> None:
    command, key = item
    cls = RUN_CLASSES[command]
    extra = ["encoder=/runs/g"] if command == "pretrain-local" and key != "encoder" else []
    try:
        config = load_config(cls, None, [f"{key}={_yaml(value)}", *extra])
    except InputError as err:
        assert "\n" not in str(err)
        assert key.split(".")[0] in str(err) or "override" in str(err)
        return
    assert dataclasses.is_dataclass(config)
    assert load_config(cls, None, [f"{key}={_yaml(value)}", *extra]) == config


def _yaml(value: object) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
