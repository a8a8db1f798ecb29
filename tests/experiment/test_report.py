"""What the report computes beyond the rows: partitions of slices, global embeddings."""

from __future__ import annotations

import numpy as np
import torch

from contraseg.config import PretrainGlobalRun
from contraseg.data.dataset import load_dataset, require_cases
from contraseg.experiment.plan import Run
from contraseg.experiment.report import global_embeddings, partition_ids
from contraseg.models.unet import partial_state_dict
from contraseg.training.checkpoint import save_weights
from contraseg.training.stages import build_global_head, build_unet


def test_partition_ids_follow_the_sampler_with_the_tail_in_the_last_partition():
    assert partition_ids(10, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert partition_ids(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert partition_ids(7, 3).tolist() == [0, 0, 1, 1, 2, 2, 2]


def test_global_embeddings_are_the_normalised_g1_of_e(tiny_config, tmp_path):
    config = tiny_config(PretrainGlobalRun, "loss.partitions=3")
    prepared, split = load_dataset(config.data)
    cases = require_cases(prepared, split, split.test[:2])
    torch.manual_seed(0)
    unet = build_unet(config.model, prepared).eval()
    height, width = cases[0].image.shape[-2:]
    head = build_global_head(config.model, unet, height, width).eval()
    g1 = {f"g1.{k}": v for k, v in head.state_dict().items()}
    save_weights(tmp_path / "weights.safetensors", {**partial_state_dict(unet), **g1})

    run = Run("pretrain-global/GD", "pretrain-global", config)
    embeddings, partitions = global_embeddings(run, tmp_path, prepared, cases, "cpu")

    with torch.no_grad():
        expected = [
            torch.nn.functional.normalize(head(unet.encode(torch.tensor(np.array(c.image)))[0]))
            for c in cases
        ]
    np.testing.assert_allclose(embeddings, torch.cat(expected).numpy(), rtol=1e-5, atol=1e-6)
    assert partitions.tolist() == [
        p for c in cases for p in partition_ids(c.num_slices, 3).tolist()
    ]
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0)
