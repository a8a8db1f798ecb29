"""Helpers shared by the tests of the pre-training stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contraseg.config import FinetuneRun
from contraseg.training.checkpoint import load_weights
from contraseg.training.stages import Finetuner


@pytest.fixture
def assert_finetune_takes(tiny_config, tmp_path):
    """``assert_finetune_takes(run_dir, init)``: fine-tuning with ``init`` from ``run_dir``
    loads exactly its encoder (and decoder) tensors, unchanged."""

    def check(source: Path, init: str) -> None:
        config = tiny_config(FinetuneRun, f"finetune.init={init}", f"finetune.pretrained={source}")
        trainer = Finetuner(config, tmp_path / "ft")
        trainer.setup()
        pretrained = load_weights(source / "weights.safetensors")
        prefixes = ("encoder.", "decoder.") if init == "encoder+decoder" else ("encoder.",)
        expected = sorted(k for k in pretrained if k.startswith(prefixes))
        assert expected and trainer.transferred == expected
        own = trainer.unet.state_dict()
        assert all(torch.equal(own[k].cpu(), pretrained[k]) for k in expected)

    return check
