"""The paper's three stages as :class:`~contraseg.training.trainer.Trainer` subclasses.

1. :class:`GlobalPretrainer`: encoder ``e`` + ``g1`` with the global contrastive loss.
2. :class:`LocalPretrainer`: decoder blocks ``d_l`` + ``g2`` with the local contrastive loss on
   top of the stage-1 encoder, whose weights get no gradient. With ``loss.encoder_bn=frozen``
   (the default) its batch-norm layers stay in eval mode, so they normalise with the running
   statistics learnt in stage 1: stage 2 sees one fixed function ``e``. With ``batch`` they
   normalise each batch with its own statistics, as the official code does, without using or
   updating the running ones. Either way stage 3 receives exactly the stage-1 encoder tensors
   (docs/training.md).
3. :class:`Finetuner`: the whole UNet on 1, 2 or 8 labelled volumes, from random weights, from
   ``e`` or from ``e`` + ``d_l``, validated on the two validation volumes every
   ``finetune.val_every`` iterations; the best-validation weights are the stage's product.

Each stage writes ``weights.safetensors``: stage 1 the encoder (keys ``encoder.*``) and
``g1.*``; stage 2 the encoder, ``decoder.0..l-1.*`` and ``g2.*``; stage 3 the whole UNet.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from torch import nn

from contraseg import __version__
from contraseg.config import (
    FinetuneRun,
    GlobalLossConfig,
    LocalLossConfig,
    ModelConfig,
    PretrainGlobalRun,
    PretrainLocalRun,
    to_dict,
)
from contraseg.data.augment import (
    apply_finetune,
    apply_view,
    finetune_augment,
    pretrain_view,
    transformed_view,
)
from contraseg.data.cache import PreparedCase, PreparedDataset
from contraseg.data.dataset import load_dataset, require_cases
from contraseg.data.mixup import mixup, sample_mixup
from contraseg.data.readers import get_reader
from contraseg.data.sampling import PartitionSampler, RandomSliceSampler, SliceBatch, SlicePool
from contraseg.data.splits import Split
from contraseg.errors import InputError
from contraseg.evaluation.evaluate import mean_case_dice
from contraseg.inference import Architecture, ModelBundle, Preprocessing, Provenance, Segmenter
from contraseg.losses import (
    GlobalPairs,
    all_gather_rows,
    all_gather_with_grad,
    check_neg_index,
    gather_ids,
    global_chance_level,
    global_loss_from_pairs,
    global_pairs,
    local_chance_level,
    local_loss_from_pairs,
    local_pairs,
    one_hot,
    segmentation_loss,
)
from contraseg.losses.local_contrastive import masked_chance_from_pairs
from contraseg.models.heads import (
    GlobalHead,
    LocalEmbedder,
    official_region_grid,
    points_inside,
    region_points,
    view_points,
)
from contraseg.models.unet import UNet, load_partial, partial_state_dict
from contraseg.training.checkpoint import load_weights, save_weights
from contraseg.training.trainer import Speed, Trainer


class SliceSource(Protocol):
    """What a stage draws its batches from (the samplers of ``contraseg.data.sampling``)."""

    def sample(self) -> SliceBatch: ...


def build_unet(config: ModelConfig, prepared: PreparedDataset, outputs: int | None = None) -> UNet:
    """The UNet of ``config`` for ``prepared``, with the dataset's classes as outputs (or
    ``outputs``, for a pretext task that reconstructs the image). ``model.in_channels`` and
    ``model.num_classes`` may only repeat what the dataset says (0 takes it from the dataset):
    the labels, the classes of the model bundle and the input channels all come from it."""
    for key, given, found in (
        ("model.in_channels", config.in_channels, prepared.in_channels),
        ("model.num_classes", config.num_classes, prepared.num_classes),
    ):
        if given and given != found:
            raise InputError(
                key, f"is {given}, but the dataset has {found} (0: take it from there)"
            )
    return UNet(prepared.in_channels, outputs or prepared.num_classes, tuple(config.widths))


def build_global_head(
    config: ModelConfig, unet: UNet, height: int, width: int, out: int | None = None
) -> GlobalHead:
    """g1 of ``config`` on ``unet``'s bottleneck for height x width slices, with ``out``
    outputs (default ``model.g1_out``; a pretext classifier has its own)."""
    return GlobalHead(
        unet.bottleneck_features(height, width),
        config.g1_hidden,
        out or config.g1_out,
        config.g1_batch_norm,
    )


def load_pretrained(unet: UNet, run_dir: str | Path, what: str, decoder: bool = False) -> list[str]:
    """Copy ``e`` (and with ``decoder`` the blocks ``d_l``) from an earlier stage's
    ``weights.safetensors`` into ``unet``; return the loaded keys. A missing run, missing
    parts or mismatched shapes are an :class:`InputError` naming the file."""
    if not run_dir:
        raise InputError(None, f"{what}: no run directory given")
    source = Path(run_dir) / "weights.safetensors"
    prefixes = ("encoder.", "decoder.") if decoder else ("encoder.",)
    state = {k: v for k, v in load_weights(source).items() if k.startswith(prefixes)}
    if not any(k.startswith("encoder.") for k in state):
        raise InputError(source, "holds no encoder weights")
    if decoder and not any(k.startswith("decoder.") for k in state):
        raise InputError(
            source,
            "holds no decoder blocks: give a run that pre-trained them (pretrain-local, "
            "pretrain-joint, or pretrain-pretext with inpainting or context_restoration)",
        )
    try:
        return load_partial(unet, state)
    except ValueError as err:
        raise InputError(source, str(err)) from None


def pretraining_sampler(
    trainer: Trainer,
    prepared: PreparedDataset,
    split: Split,
    loss: GlobalLossConfig | LocalLossConfig,
    random_slices: bool,
    batch_size: int,
    pool: SlicePool | None = None,
) -> RandomSliceSampler | PartitionSampler:
    """The sampler of the pre-training pool, on the trainer's device and rank: random slices
    (G^R, L^R) or ``m`` volumes x ``S`` partitions (G^D-, G^D, L^D); batch sizes are per rank.
    ``pool``: the pre-training volumes already in a pool (two samplers can share one)."""
    cases = require_cases(prepared, split, split.pretrain)
    pool = pool or trainer.slice_pool([case.image for case in cases])
    rank = {"rank": trainer.rank, "world_size": trainer.world_size}
    if random_slices:
        return RandomSliceSampler(
            pool, batch_size, trainer.sample_generator, partitions=loss.partitions, **rank
        )
    try:
        return PartitionSampler(
            pool,
            loss.partitions,
            loss.volumes_per_batch,
            trainer.sample_generator,
            names=[str(c.image_path) for c in cases],
            **rank,
        )
    except ValueError as err:
        raise InputError(None, f"loss.volumes_per_batch: {err}") from None


def two_view_ids(
    sampler: RandomSliceSampler | PartitionSampler, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The (image, volume, partition) ids the contrastive losses see for this sampler's
    batches stacked as [view 1 | view 2]: every rank's rows in rank order (``gather_ids``).

    Which rows are views of one image, share a volume or a partition is the same in every
    batch (m distinct volumes x S partitions, or images alone for G^R and L^R, which need no
    volume ids), so the losses' pairs are found once from these ids; that search waits for
    the device, the loss on the pairs does not. Every rank must call this (it gathers).
    """
    if isinstance(sampler, PartitionSampler):
        volumes, partitions = sampler.layout()
        images = torch.arange(len(volumes)).repeat(2)
        return gather_ids(images, volumes.repeat(2), partitions.repeat(2), device)
    return gather_ids(torch.arange(sampler.batch_size).repeat(2), device=device)


@dataclass(frozen=True)
class LocalHead:
    """g2 on d_l with its regions: the official negatives (None: all; checked by
    ``check_neg_index``), the feature-map size and each region's sampling points (for views
    with their own transform)."""

    embedder: LocalEmbedder
    neg_index: torch.Tensor | None
    fmap_size: tuple[int, int]
    points: torch.Tensor

    @property
    def chance(self) -> float:
        """The local loss when all region embeddings are equal."""
        return local_chance_level(self.points.shape[0], self.neg_index)


def local_embedder(
    unet: UNet,
    loss: LocalLossConfig,
    model: ModelConfig,
    height: int,
    width: int,
    section: str = "loss",
) -> LocalHead:
    """g2 on d_l for ``height`` x ``width`` inputs; errors name the config ``section`` that
    holds ``loss``."""
    blocks = loss.decoder_blocks
    scale = 2 ** (5 - blocks)
    fmap_size = (height // scale, width // scale)
    try:
        grid = official_region_grid(*fmap_size, loss.region_size, loss.k1_regions)
    except ValueError as err:
        raise InputError(None, f"{section}.decoder_blocks={blocks}: {err}") from None
    embedder = LocalEmbedder(
        unet.decoder_channels(blocks),
        grid.corners,
        size=loss.region_size,
        project=model.g2_project,
        out=model.g2_out,
    )
    neg_index = None
    if loss.negatives == "official":
        neg_index = check_neg_index(grid.neg_index, len(grid.corners))
    return LocalHead(
        embedder, neg_index, fmap_size, region_points(grid.corners, loss.region_size, fmap_size)
    )


def prefixed_state(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s tensors under ``prefix.``: how a head (g1, g2) is stored beside the UNet."""
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


class GlobalNet(nn.Module):
    """Images to global embeddings, ``g1(e(x))``: the network that trains in stage 1."""

    def __init__(self, unet: UNet, g1: GlobalHead) -> None:
        super().__init__()
        self.unet, self.g1 = unet, g1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.g1(self.unet.encode(images)[0])


class LocalNet(nn.Module):
    """Images to region embeddings through the frozen ``e``, ``d_1..d_l`` and ``g2``: the
    network that trains in stage 2."""

    def __init__(self, unet: UNet, embedder: LocalEmbedder, blocks: int) -> None:
        super().__init__()
        self.unet, self.embedder, self.blocks = unet, embedder, blocks

    def forward(self, images: torch.Tensor, points: torch.Tensor | None = None) -> torch.Tensor:
        """``points``: each image's region sampling points (views with their own transform)."""
        with torch.no_grad():
            bottleneck, skips = self.unet.encode(images)
        return self.embedder(self.unet.decode(bottleneck, skips, blocks=self.blocks), points)


class GlobalPretrainer(Trainer):
    """Stage 1. A batch is ``m`` volumes x ``S`` partitions (one slice each), two views each.

    G^R draws the same number of slices uniformly from all slices instead, so that every
    strategy sees batches of one size.
    """

    stage = "pretrain-global"
    config: PretrainGlobalRun

    def setup(self) -> None:
        cfg = self.config
        prepared, split = load_dataset(cfg.data)
        loss_cfg = cfg.loss
        batch = loss_cfg.volumes_per_batch * loss_cfg.partitions
        self.sampler = pretraining_sampler(
            self, prepared, split, loss_cfg, loss_cfg.strategy == "GR", batch
        )
        self.unet = build_unet(cfg.model, prepared)
        self.unet.decoder.requires_grad_(False)  # not part of stage 1
        self.unet.head.requires_grad_(False)
        height, width = self.sampler.pool.slice_shape[-2:]
        self.g1 = build_global_head(cfg.model, self.unet, height, width)
        self.model = nn.ModuleDict({"unet": self.unet, "g1": self.g1}).to(self.device)
        self.net = GlobalNet(self.unet, self.g1)
        self.optimizer = self.adam([*self.unet.encoder.parameters(), *self.g1.parameters()])
        self.augment_fn = apply_view
        self.loss_fn = functools.partial(global_loss_from_pairs, temperature=loss_cfg.temperature)
        self.pairs: GlobalPairs | None = None  # found at the first iteration (they gather)
        self.chance = math.nan

    def compute_loss(self, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        if self.pairs is None:
            ids = two_view_ids(self.sampler, self.device)
            self.pairs = global_pairs(*ids, strategy=cfg.loss.strategy, device=self.device)
            self.chance = global_chance_level(*ids, strategy=cfg.loss.strategy)
        images = self.sampler.sample().images
        gen, apply = self.augment_generator, self.augment_fn
        views = pretrain_view(images, cfg.augment, gen, views=2, apply=apply)
        z = all_gather_with_grad(self.net(views))
        return self.loss_fn(z, self.pairs), {"chance": self.chance}

    def final_weights(self) -> dict[str, torch.Tensor]:
        return {**partial_state_dict(self.unet), **prefixed_state("g1", self.g1)}


class LocalPretrainer(Trainer):
    """Stage 2. L^R: random slices; L^D: ``m`` volumes x ``S`` partitions. Two views each:
    intensity-only (``loss.views=aligned``: region (u, v) of one view is (u, v) of the other),
    or each with its own crop and flip, region u sampled where each view shows it and skipped
    where it does not (``transformed``, docs/local-views.md).
    """

    stage = "pretrain-local"
    config: PretrainLocalRun

    def setup(self) -> None:
        cfg = self.config
        loss_cfg = cfg.loss
        prepared, split = load_dataset(cfg.data)
        self.sampler = pretraining_sampler(
            self, prepared, split, loss_cfg, loss_cfg.strategy == "LR", cfg.optim.batch_size
        )
        self.unet = build_unet(cfg.model, prepared)
        load_pretrained(self.unet, cfg.encoder, "encoder")
        self.unet.requires_grad_(False)  # only d_1..d_l (and g2) train
        blocks = loss_cfg.decoder_blocks
        self.unet.decoder[:blocks].requires_grad_(True)
        if loss_cfg.encoder_bn == "batch":
            for module in self.unet.encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    # in train mode: batch statistics, running ones neither used nor updated
                    module.track_running_stats = False

        height, width = self.sampler.pool.slice_shape[-2:]
        local = local_embedder(self.unet, loss_cfg, cfg.model, height, width)
        self.embedder, self.fmap_size = local.embedder, local.fmap_size
        self.region_points = local.points.to(self.device)
        self.model = nn.ModuleDict({"unet": self.unet, "g2": self.embedder}).to(self.device)
        self.net = LocalNet(self.unet, self.embedder, blocks)
        decoder = [p for block in self.unet.decoder[:blocks] for p in block.parameters()]
        self.optimizer = self.adam([*decoder, *self.embedder.parameters()])
        self.neg_index = None if local.neg_index is None else local.neg_index.to(self.device)
        self.augment_fn = apply_view
        self.loss_fn = functools.partial(local_loss_from_pairs, temperature=loss_cfg.temperature)
        self.chance = local.chance
        self.pairs: tuple[torch.Tensor, torch.Tensor] | None = None  # at the first iteration

    def compute_loss(self, iteration: int) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.config
        if self.pairs is None:
            ids = two_view_ids(self.sampler, self.device)
            self.pairs = local_pairs(*ids, strategy=cfg.loss.strategy, device=self.device)
        if cfg.loss.encoder_bn == "frozen":
            self.unet.encoder.eval()  # batch norm included (see the module docstring)
        images = self.sampler.sample().images
        gen, apply = self.augment_generator, self.augment_fn
        if cfg.loss.views == "aligned":
            views = pretrain_view(images, cfg.augment, gen, crop=False, views=2, apply=apply)
            regions = all_gather_with_grad(self.net(views))
            return self.loss_fn(regions, *self.pairs, self.neg_index), {"chance": self.chance}
        views, theta = transformed_view(images, cfg.augment, gen, views=2, apply=apply)
        points = view_points(self.region_points, theta)
        regions = all_gather_with_grad(self.net(views, points))
        valid = all_gather_rows(points_inside(points, self.fmap_size))
        loss = self.loss_fn(regions, *self.pairs, self.neg_index, valid=valid)
        return loss, {"chance": masked_chance_from_pairs(valid, *self.pairs, self.neg_index)}

    def final_weights(self) -> dict[str, torch.Tensor]:
        state = partial_state_dict(self.unet, True, self.config.loss.decoder_blocks)
        return {**state, **prefixed_state("g2", self.embedder)}


class Finetuner(Trainer):
    """Stage 3. Batches of labelled slices drawn with replacement, geometric augmentation.

    Validation predicts the validation volumes with the same :class:`Segmenter` that
    ``contraseg predict`` and ``evaluate`` use; the run ends with a model bundle
    (``model.json`` beside ``weights.safetensors``) that needs nothing else to be used.
    """

    stage = "finetune"
    config: FinetuneRun

    def setup(self) -> None:
        cfg = self.config
        ft = cfg.finetune
        prepared, split = load_dataset(cfg.data)
        self.labelled_set_name, labelled = split.choose(
            ft.labelled_volumes, ft.combination, ft.train, ft.val
        )
        train = require_cases(prepared, split, labelled.train)
        self.val_cases = require_cases(prepared, split, labelled.val)
        for case in (*train, *self.val_cases):
            if case.label is None:
                raise InputError(
                    case.image_path, f"case {case.case_id} has no label: it cannot be fine-tuned on"
                )
        self.train_ids = tuple(labelled.train)
        self.num_classes = prepared.num_classes
        for case in train:  # once here, so that the loss need not check every batch
            if int(case.label.max()) >= self.num_classes:
                raise InputError(
                    case.label_path,
                    f"holds label {int(case.label.max())}, but the dataset has "
                    f"{self.num_classes} classes",
                )
        self.sampler = self.train_sampler(train, split)
        self.unet = build_unet(cfg.model, prepared)
        self.transferred = self._initialise()
        self.model = self.unet.to(self.device)
        self.net = self.unet
        self.optimizer = self.adam(self.unet.parameters())
        self.augment_fn = apply_finetune
        self.loss_fn = segmentation_loss(ft.loss, self.num_classes, check_labels=False)
        self.bundle = self._bundle(prepared)
        self.segmenter = Segmenter([self.unet], [self.bundle], self.device)
        self.best_dice = -1.0
        self.best_iteration = 0

    def train_sampler(self, train: list[PreparedCase], split: Split) -> SliceSource:
        """Batches of ``optim.batch_size`` labelled slices (self-training adds pseudo-labels)."""
        return RandomSliceSampler(
            self.slice_pool([case.image for case in train], [case.label for case in train]),
            self.config.optim.batch_size,
            self.sample_generator,
            rank=self.rank,
            world_size=self.world_size,
        )

    def _initialise(self) -> list[str]:
        """Load ``e`` (or ``e`` + ``d_l``) from the pre-trained run; return the loaded keys."""
        ft = self.config.finetune
        if ft.init == "random":
            return []
        what = f"finetune.init={ft.init}"
        return load_pretrained(self.unet, ft.pretrained, what, ft.init == "encoder+decoder")

    def _bundle(self, prepared: PreparedDataset) -> ModelBundle:
        """Everything prediction needs, resolved; provenance is completed by :meth:`run`."""
        cfg = self.config
        reader = get_reader(cfg.data)
        params = prepared.params
        config_text = yaml.safe_dump(to_dict(cfg), sort_keys=True)
        return ModelBundle(
            architecture=Architecture(
                tuple(self.unet.widths), self.unet.in_channels, self.unet.num_classes
            ),
            class_names=tuple(prepared.class_names),
            label_values=tuple(reader.label_values),
            preprocessing=Preprocessing(
                target_spacing=params.target_spacing,
                size=params.size,
                percentiles=params.percentiles,
                n4=params.n4,
                channel=reader.channel,
                orientation=reader.orientation,
                normalise_mask=params.normalise_mask,
                foreground_fractions=tuple(
                    prepared.intensity[case_id].foreground_fraction for case_id in self.train_ids
                ),
            ),
            absent_classes=reader.absent_classes,
            provenance=Provenance(
                dataset=cfg.data.dataset,
                labelled_set=self.labelled_set_name,
                train_cases=self.train_ids,
                val_cases=tuple(c.case_id for c in self.val_cases),
                init=cfg.finetune.init,
                pretrained=cfg.finetune.pretrained,
                iterations=cfg.optim.iterations,
                best_val_dice=None,
                best_iteration=None,
                contraseg_version=__version__,
                config_sha256=hashlib.sha256(config_text.encode()).hexdigest(),
            ),
        )

    def compute_loss(self, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = self.sampler.sample()
        assert batch.labels is not None  # a labelled pool
        images, labels = finetune_augment(
            batch.images, batch.labels, self.config.augment, self.augment_generator, self.augment_fn
        )
        target, ignore = self.targets(labels)
        alpha = self.config.finetune.mixup_alpha
        if alpha > 0:
            lam, perm = sample_mixup(images.shape[0], alpha, self.augment_generator)
            images, target, ignore = mixup(
                images, one_hot(target, self.num_classes), lam, perm, ignore
            )
        return self.loss_fn(self.net(images), target, ignore), {}

    def targets(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss's target and ignore mask for augmented labels (self-training adds one)."""
        return labels, None

    def should_validate(self, iteration: int) -> bool:
        return iteration % self.config.finetune.val_every == 0

    @property
    def best_path(self) -> Path:
        return self.run_dir / "checkpoints" / "best.safetensors"

    def validate(self, iteration: int) -> dict[str, float]:
        if not self.val_cases:  # finetune.val=[]: no selection, the last weights are the product
            return {}
        dice = mean_case_dice(self.segmenter, self.val_cases, self.num_classes)
        if dice > self.best_dice:
            self.best_dice, self.best_iteration = dice, iteration
            save_weights(self.best_path, self.unet.state_dict())
        return {"val_dice": dice, "best_val_dice": self.best_dice}

    def extra_state(self) -> dict[str, Any]:
        return {"best_dice": self.best_dice, "best_iteration": self.best_iteration}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.best_dice = float(state["best_dice"])
        self.best_iteration = int(state["best_iteration"])

    def final_weights(self) -> dict[str, torch.Tensor]:
        """Model selection as the paper: the best-validation weights."""
        return load_weights(self.best_path) if self.best_path.exists() else self.unet.state_dict()

    def write_products(self) -> None:
        """``model.json`` beside the weights: the run directory becomes a model bundle."""
        validated = bool(self.val_cases) and self.best_dice >= 0
        provenance = dataclasses.replace(
            self.bundle.provenance,
            iterations=self.iteration,
            best_val_dice=self.best_dice if validated else None,
            best_iteration=self.best_iteration if validated else None,
        )
        dataclasses.replace(self.bundle, provenance=provenance).write(self.run_dir)

    def summary(self) -> str:
        selection = (
            f"best validation Dice {self.best_dice:.4f} at iteration {self.best_iteration}"
            if self.val_cases
            else "no validation cases, so the last weights are kept"
        )
        return (
            f"{super().summary()}; {selection}; "
            f"predict with `contraseg predict -m {self.run_dir} -i INPUT -o OUTPUT`"
        )


def run_pretrain_global(
    config: PretrainGlobalRun,
    out: Path,
    device: str = "auto",
    fresh: bool = False,
    speed: Speed | None = None,
) -> Path:
    return GlobalPretrainer(config, out, device, speed).run(fresh)


def run_pretrain_local(
    config: PretrainLocalRun,
    out: Path,
    device: str = "auto",
    fresh: bool = False,
    speed: Speed | None = None,
) -> Path:
    return LocalPretrainer(config, out, device, speed).run(fresh)


def run_finetune(
    config: FinetuneRun,
    out: Path,
    device: str = "auto",
    fresh: bool = False,
    speed: Speed | None = None,
) -> Path:
    """One fine-tune, or with ``finetune.self_training_rounds`` the self-training rounds."""
    if config.finetune.self_training_rounds:
        from contraseg.training.self_training import run_self_training  # it builds on Finetuner

        return run_self_training(config, out, device, fresh, speed)
    return Finetuner(config, out, device, speed).run(fresh)
