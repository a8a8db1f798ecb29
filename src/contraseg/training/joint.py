"""Joint pre-training (supplement 3.4, Table 7): e, d_l, g1 and g2 in one stage.

The loss is ``L = L_g + lambda * L_l`` (``lambda_local``): unlike the stage-wise method, the
encoder is updated by the local loss too. Each loss keeps the batch and views of its own stage
(:class:`~contraseg.training.stages.GlobalPretrainer`: m volumes x S partitions, two cropped
views; :class:`~contraseg.training.stages.LocalPretrainer`: intensity-only views of L^R's random
slices or L^D's partitions), so the two methods differ only in how they are optimised. Both
batches go through the encoder in one pass, so its batch norm sees them together. The product
holds ``encoder.*``, ``decoder.0..l-1.*``, ``g1.*`` and ``g2.*``, and fine-tuning takes it with
``finetune.init=encoder+decoder`` (or ``encoder``). docs/extensions.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from contraseg.config import PretrainJointRun
from contraseg.data.augment import pretrain_view
from contraseg.data.dataset import load_dataset
from contraseg.losses import (
    global_chance_level,
    global_contrastive_loss,
    local_chance_level,
    local_contrastive_loss,
)
from contraseg.models.heads import GlobalHead
from contraseg.models.unet import partial_state_dict
from contraseg.training.stages import (
    _prefixed,
    _two_views,
    build_unet,
    local_embedder,
    pretraining_sampler,
)
from contraseg.training.trainer import Trainer


class JointPretrainer(Trainer):
    """Stage 1 and stage 2 at once; see the module docstring."""

    stage = "pretrain-joint"
    config: PretrainJointRun

    def setup(self) -> None:
        cfg = self.config
        prepared, split = load_dataset(cfg.data)
        glob, local = cfg.global_loss, cfg.local_loss
        self.global_sampler, volumes = pretraining_sampler(
            prepared,
            split,
            glob,
            glob.strategy == "GR",
            glob.volumes_per_batch * glob.partitions,
            self.rng,
        )
        self.local_sampler, _ = pretraining_sampler(
            prepared, split, local, local.strategy == "LR", cfg.optim.batch_size, self.rng
        )
        self.unet = build_unet(cfg.model, prepared)
        height, width = volumes[0].shape[-2:]
        self.g1 = GlobalHead(
            self.unet.bottleneck_features(height, width), cfg.model.g1_hidden, cfg.model.g1_out
        )
        head = local_embedder(self.unet, local, cfg.model, height, width, section="local_loss")
        self.embedder, self.neg_index = head.embedder, head.neg_index
        self.model = nn.ModuleDict({"unet": self.unet, "g1": self.g1, "g2": self.embedder})
        self.model.to(self.device)
        decoder = self.unet.decoder[: local.decoder_blocks]
        params = [
            *self.unet.encoder.parameters(),
            *decoder.parameters(),
            *self.g1.parameters(),
            *self.embedder.parameters(),
        ]
        self.optimizer = torch.optim.Adam(params, lr=cfg.optim.lr)

    def compute_loss(self, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        glob, local = cfg.global_loss, cfg.local_loss
        global_batch, local_batch = self.global_sampler.sample(), self.local_sampler.sample()
        images = global_batch.images.to(self.device, non_blocking=True)
        global_views = torch.cat(
            [pretrain_view(images, cfg.augment, self.augment_generator) for _ in range(2)]
        )
        images = local_batch.images.to(self.device, non_blocking=True)
        local_views = torch.cat(
            [
                pretrain_view(images, cfg.augment, self.augment_generator, crop=False)
                for _ in range(2)
            ]
        )
        bottleneck, skips = self.unet.encode(torch.cat([global_views, local_views]))
        n = global_views.shape[0]
        z = self.g1(bottleneck[:n])
        fmap = self.unet.decode(
            bottleneck[n:], [skip[n:] for skip in skips], blocks=local.decoder_blocks
        )
        regions = self.embedder(fmap)

        global_ids = _two_views(global_batch, global_views)
        local_ids = _two_views(local_batch, local_views)
        neg_index = None if self.neg_index is None else self.neg_index.to(self.device)
        loss_global = global_contrastive_loss(
            z, *global_ids, strategy=glob.strategy, temperature=glob.temperature
        )
        loss_local = local_contrastive_loss(
            regions,
            *local_ids,
            strategy=local.strategy,
            neg_index=neg_index,
            temperature=local.temperature,
        )
        stats = {
            "global": loss_global.detach(),
            "local": loss_local.detach(),
            "chance_global": global_chance_level(*global_ids, strategy=glob.strategy),
            "chance_local": local_chance_level(regions.shape[1], self.neg_index),
        }
        return loss_global + cfg.lambda_local * loss_local, stats  # type: ignore[return-value]

    def final_weights(self) -> dict[str, torch.Tensor]:
        state = partial_state_dict(self.unet, True, self.config.local_loss.decoder_blocks)
        return {**state, **_prefixed("g1", self.g1), **_prefixed("g2", self.embedder)}


def run_pretrain_joint(
    config: PretrainJointRun, out: Path, device: str = "auto", fresh: bool = False
) -> Path:
    return JointPretrainer(config, out, device).run(fresh)
