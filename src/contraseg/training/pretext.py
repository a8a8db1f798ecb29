"""Pretext-task pre-training, the baselines of the paper's Table 1 (docs/extensions.md).

``pretext.task``:

- ``rotation``: the encoder and a classifier on its flattened output (g1's architecture with 4
  outputs) predict which of the four rotations an image was given; every image of the batch is
  shown in all four (Gidaris et al. 2018). Product: ``encoder.*`` (and the classifier as
  ``pretext_head.*``), for ``finetune.init=encoder``.
- ``inpainting``: the whole UNet, with one linear output per image channel, restores the
  zeroed boxes; the loss is the mean squared error inside the boxes (Pathak et al. 2016,
  without their adversarial term).
- ``context_restoration``: the whole UNet restores images whose patches were swapped; the loss
  is the mean squared error over the image (Chen et al. 2019).

The two reconstruction tasks train all five decoder blocks (the image is restored at full
resolution); their product holds ``encoder.*``, ``decoder.0..l-1.*`` for
``l = pretext.decoder_blocks`` (default 5, the whole decoder) and the output convolutions as
``pretext_head.*``, so ``finetune.init=encoder+decoder`` loads e and d_1..d_l as it does from a
contrastive run. The images are drawn as ``optim.batch_size`` random slices of the
pre-training pool and, with ``pretext.augment``, cropped and intensity-augmented as the
contrastive views are, before the corruption.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from contraseg.config import PretrainPretextRun
from contraseg.data.augment import pretrain_view
from contraseg.data.dataset import load_dataset, require_cases
from contraseg.data.pretext import (
    ROTATIONS,
    box_mask,
    inpaint,
    patch_side,
    rotation_batch,
    sample_boxes,
    sample_swaps,
    swap_patches,
)
from contraseg.data.sampling import RandomSliceSampler
from contraseg.errors import InputError
from contraseg.models.unet import partial_state_dict
from contraseg.training.stages import build_global_head, build_unet, prefixed_state
from contraseg.training.trainer import Speed, Trainer


class PretextPretrainer(Trainer):
    """One pretext task on the pre-training pool; see the module docstring."""

    stage = "pretrain-pretext"
    config: PretrainPretextRun

    def setup(self) -> None:
        cfg = self.config
        prepared, split = load_dataset(cfg.data)
        volumes = [case.image for case in require_cases(prepared, split, split.pretrain)]
        self.sampler = RandomSliceSampler(
            self.slice_pool(volumes), cfg.optim.batch_size, self.sample_generator
        )
        self.size: tuple[int, int] = tuple(volumes[0].shape[-2:])  # type: ignore[assignment]
        task = cfg.pretext.task
        if task == "rotation":
            if self.size[0] != self.size[1]:
                raise InputError(
                    None,
                    f"pretext.task=rotation needs square slices, these are {self.size[0]}x"
                    f"{self.size[1]}: set data.size",
                )
            self.unet = build_unet(cfg.model, prepared)
            self.head: nn.Module = build_global_head(cfg.model, self.unet, *self.size, ROTATIONS)
            trained = [*self.unet.encoder.parameters(), *self.head.parameters()]
            self.model = nn.ModuleDict({"unet": self.unet, "head": self.head})
        else:
            # the UNet with one linear output per image channel restores the image
            channels = cfg.model.in_channels or prepared.in_channels
            self.unet = build_unet(cfg.model, prepared, outputs=channels)
            self.head = self.unet.head
            trained = list(self.unet.parameters())
            self.model = self.unet
        if task == "context_restoration":
            self.patch = patch_side(self.size, cfg.pretext.patch_fraction)
            try:  # fail at setup, not at the first iteration
                sample_swaps(1, self.size, cfg.pretext.swaps, self.patch, torch.Generator())
            except ValueError as err:
                raise InputError(None, f"pretext.swaps: {err}") from None
        self.optimizer = self.adam(trained)

    def compute_loss(self, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        pretext = cfg.pretext
        images = self.sampler.sample().images
        if pretext.augment:
            images = pretrain_view(images, cfg.augment, self.augment_generator)
        batch = images.shape[0]
        if pretext.task == "rotation":
            rotated, labels = rotation_batch(images)
            logits = self.head(self.unet.encode(rotated)[0]).float()
            accuracy = (logits.argmax(dim=1) == labels).float().mean().detach()
            stats = {"accuracy": accuracy, "chance": math.log(ROTATIONS)}
            return F.cross_entropy(logits, labels), stats  # type: ignore[return-value]
        if pretext.task == "inpainting":
            boxes = sample_boxes(
                batch, self.size, pretext.boxes, pretext.box_fraction, self.augment_generator
            )
            mask = box_mask(boxes, self.size).to(self.device)
            restored = self.unet(inpaint(images, mask)).float()
            # the mean squared error over the masked pixels, without indexing by the mask
            # (which would wait for the device)
            inside = mask[:, None].expand_as(restored).float()
            error = ((restored - images.float()) ** 2 * inside).sum()
            return error / inside.sum().clamp(min=1), {}
        swaps = sample_swaps(batch, self.size, pretext.swaps, self.patch, self.augment_generator)
        restored = self.unet(swap_patches(images, swaps, self.patch)).float()
        return F.mse_loss(restored, images.float()), {}

    def final_weights(self) -> dict[str, torch.Tensor]:
        cfg = self.config
        blocks = 0 if cfg.pretext.task == "rotation" else cfg.pretext.decoder_blocks
        return {
            **partial_state_dict(self.unet, True, blocks),
            **prefixed_state("pretext_head", self.head),
        }


def run_pretrain_pretext(
    config: PretrainPretextRun,
    out: Path,
    device: str = "auto",
    fresh: bool = False,
    speed: Speed | None = None,
) -> Path:
    return PretextPretrainer(config, out, device, speed).run(fresh)
