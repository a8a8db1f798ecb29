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
    GlobalPairs,
    global_chance_level,
    global_loss_from_pairs,
    global_pairs,
    local_loss_from_pairs,
    local_pairs,
)
from contraseg.models.unet import partial_state_dict
from contraseg.training.stages import (
    build_global_head,
    build_unet,
    local_embedder,
    prefixed_state,
    pretraining_sampler,
    two_view_ids,
)
from contraseg.training.trainer import Speed, Trainer


class JointPretrainer(Trainer):
    """Stage 1 and stage 2 at once; see the module docstring. One process (no ``self.net``:
    two batches and two heads do not fit one data-parallel module)."""

    stage = "pretrain-joint"
    config: PretrainJointRun

    def setup(self) -> None:
        cfg = self.config
        prepared, split = load_dataset(cfg.data)
        glob, local = cfg.global_loss, cfg.local_loss
        self.global_sampler = pretraining_sampler(
            self,
            prepared,
            split,
            glob,
            glob.strategy == "GR",
            glob.volumes_per_batch * glob.partitions,
        )
        self.local_sampler = pretraining_sampler(
            self,
            prepared,
            split,
            local,
            local.strategy == "LR",
            cfg.optim.batch_size,
            pool=self.global_sampler.pool,
        )
        self.unet = build_unet(cfg.model, prepared)
        height, width = self.global_sampler.pool.slice_shape[-2:]
        self.g1 = build_global_head(cfg.model, self.unet, height, width)
        head = local_embedder(self.unet, local, cfg.model, height, width, section="local_loss")
        self.embedder = head.embedder
        self.neg_index = None if head.neg_index is None else head.neg_index.to(self.device)
        self.model = nn.ModuleDict({"unet": self.unet, "g1": self.g1, "g2": self.embedder})
        self.model.to(self.device)
        decoder = self.unet.decoder[: local.decoder_blocks]
        self.optimizer = self.adam(
            [
                *self.unet.encoder.parameters(),
                *decoder.parameters(),
                *self.g1.parameters(),
                *self.embedder.parameters(),
            ]
        )
        self.local_chance = head.chance
        # the pairs of both losses are the same in every batch: found at the first iteration
        self.pairs: tuple[GlobalPairs, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.global_chance = 0.0

    def compute_loss(self, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        glob, local = cfg.global_loss, cfg.local_loss
        if self.pairs is None:
            ids = two_view_ids(self.global_sampler, self.device)
            self.global_chance = global_chance_level(*ids, strategy=glob.strategy)
            self.pairs = (
                global_pairs(*ids, strategy=glob.strategy, device=self.device),
                local_pairs(
                    *two_view_ids(self.local_sampler, self.device),
                    strategy=local.strategy,
                    device=self.device,
                ),
            )
        images = self.global_sampler.sample().images
        global_views = torch.cat(
            [pretrain_view(images, cfg.augment, self.augment_generator) for _ in range(2)]
        )
        images = self.local_sampler.sample().images
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
        loss_global = global_loss_from_pairs(z, self.pairs[0], glob.temperature)
        loss_local = local_loss_from_pairs(
            self.embedder(fmap), *self.pairs[1], self.neg_index, local.temperature
        )
        stats = {
            "global": loss_global.detach(),
            "local": loss_local.detach(),
            "chance_global": self.global_chance,
            "chance_local": self.local_chance,
        }
        return loss_global + cfg.lambda_local * loss_local, stats  # type: ignore[return-value]

    def final_weights(self) -> dict[str, torch.Tensor]:
        state = partial_state_dict(self.unet, True, self.config.local_loss.decoder_blocks)
        return {**state, **prefixed_state("g1", self.g1), **prefixed_state("g2", self.embedder)}


def run_pretrain_joint(
    config: PretrainJointRun,
    out: Path,
    device: str = "auto",
    fresh: bool = False,
    speed: Speed | None = None,
) -> Path:
    return JointPretrainer(config, out, device, speed).run(fresh)
