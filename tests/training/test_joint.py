"""Joint pre-training: one stage trains e, d_l, g1 and g2 with L_g + lambda * L_l."""

from __future__ import annotations

import json

import pytest
import torch

from contraseg.config import PretrainJointRun
from contraseg.training.checkpoint import load_weights
from contraseg.training.joint import JointPretrainer, run_pretrain_joint

SMALL = (
    "global_loss.volumes_per_batch=2",
    "local_loss.strategy=LD",
    "local_loss.volumes_per_batch=2",
)


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory, tiny_config):
    config = tiny_config(PretrainJointRun, "optim.iterations=2", "lambda_local=10", *SMALL)
    return run_pretrain_joint(config, tmp_path_factory.mktemp("joint") / "run")


def test_the_product_holds_encoder_decoder_blocks_and_both_heads(joint_run):
    weights = load_weights(joint_run / "weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"encoder", "decoder", "g1", "g2"}
    assert {k.split(".")[1] for k in weights if k.startswith("decoder.")} == {"0", "1", "2"}
    rows = [json.loads(line) for line in (joint_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [1, 2]
    for row in rows:  # L = L_g + lambda * L_l, each part logged with its chance level
        assert row["loss"] == pytest.approx(row["global"] + 10 * row["local"], rel=1e-5)
        assert row["chance_global"] > 0 and row["chance_local"] > 0


@pytest.mark.parametrize("init", ["encoder", "encoder+decoder"])
def test_finetune_takes_the_joint_weights(joint_run, assert_finetune_takes, init):
    assert_finetune_takes(joint_run, init)


def _gradients(tiny_config, tmp_path, lam: float) -> dict[str, torch.Tensor]:
    config = tiny_config(PretrainJointRun, f"lambda_local={lam}", "seed=4", *SMALL)
    trainer = JointPretrainer(config, tmp_path / str(lam))
    trainer.setup()
    loss, _ = trainer.compute_loss(1)
    loss.backward()
    return {name: param.grad for name, param in trainer.unet.named_parameters()}


def test_the_local_loss_trains_the_encoder_too(tiny_config, tmp_path):
    """Unlike the stage-wise method, where only L_g reaches e (supplement 3.4); the batches
    are the same for both lambdas (same seed), so the difference is lambda * grad L_l."""
    without = _gradients(tiny_config, tmp_path, 0.0)
    with_local = _gradients(tiny_config, tmp_path, 1.0)
    for name in ("encoder.blocks.0.0.1.weight", "encoder.blocks.5.1.1.weight"):
        assert not torch.allclose(without[name], with_local[name]), name
    decoder = "decoder.0.up_conv.1.weight"
    assert torch.all(without[decoder] == 0)  # lambda 0: nothing reaches d_l
    assert torch.any(with_local[decoder] != 0)
    assert without["head.2.weight"] is None  # the segmentation head is not pre-trained
