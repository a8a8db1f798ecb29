"""Self-training (``finetune.self_training_rounds``), the paper's semi-supervised baseline
(Bai et al., MICCAI 2017), alone or on top of a pre-trained initialisation.

Round 0 is an ordinary fine-tune. Each later round predicts the unlabelled volumes with the
previous round's model (its best-validation weights), keeps the pixels whose largest softmax
probability reaches ``finetune.pseudo_threshold`` (the others are ignored by the loss), and
fine-tunes again, from the same initialisation as round 0, on batches that hold labelled and
pseudo-labelled slices in the share ``finetune.pseudo_fraction``.

The unlabelled volumes are the pre-training pool without the test cases, the validation cases
and the labelled training cases; the test cases never enter training, which is checked on the
case ids of every round's training data (:func:`check_unseen`). Layout of ``--out``::

    OUT/round-0 .. round-N    one finetune run directory per round
    OUT/weights.safetensors, model.json, config.yaml
                              the last round's model bundle (``predict -m OUT``, ``evaluate``)
    OUT/self_training.json    per round: its run, validation Dice, pseudo-labelled cases and
                              the share of their pixels kept

Running the command again resumes (finished rounds are kept, pseudo-labels are predicted again
from them); ``--fresh`` starts over. docs/extensions.md.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from contraseg import fileio
from contraseg.config import FinetuneRun, save_config
from contraseg.data.cache import PreparedCase
from contraseg.data.dataset import load_dataset, require_cases
from contraseg.data.sampling import RandomSliceSampler, SliceBatch
from contraseg.data.splits import LabelledSet, Split
from contraseg.errors import InputError
from contraseg.inference import Segmenter, slice_probabilities
from contraseg.inference.bundle import read_bundle
from contraseg.losses import IGNORE_LABEL, split_ignored
from contraseg.training.stages import Finetuner, SliceSource
from contraseg.training.trainer import MARKER, RunLock, Speed, claim_run_dir, remove_empty

PRODUCTS = ("weights.safetensors", "model.json", "config.yaml", "self_training.json")


@dataclass(frozen=True)
class PseudoLabels:
    """Pseudo-labelled volumes: preprocessed images (Z, C, H, W) and labels (Z, H, W) uint8,
    :data:`~contraseg.losses.IGNORE_LABEL` where the model was not confident enough."""

    case_ids: tuple[str, ...]
    images: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]

    @property
    def kept_fraction(self) -> float:
        kept = sum(int((lab != IGNORE_LABEL).sum()) for lab in self.labels)
        return kept / max(1, sum(lab.size for lab in self.labels))


def check_unseen(training_ids: Sequence[str], test_ids: Sequence[str]) -> None:
    """Refuse training data that holds a test case: the test set must stay unseen."""
    leaked = sorted(set(training_ids) & set(test_ids))
    if leaked:
        raise InputError(
            None, f"self-training would train on test cases {leaked}: the test set must stay unseen"
        )


def unlabelled_pool(split: Split, labelled: LabelledSet) -> tuple[str, ...]:
    """The pre-training pool without test, validation and labelled training cases."""
    excluded = {*split.test, *labelled.train, *labelled.val}
    pool = tuple(case for case in split.pretrain if case not in excluded)
    check_unseen(pool, split.test)
    if not pool:
        raise InputError(
            split.source or None,
            "self-training: the pre-training pool holds no volume that is not a test, "
            "validation or labelled case, so there is nothing to pseudo-label",
        )
    return pool


def pseudo_label(
    segmenter: Segmenter, cases: Sequence[PreparedCase], threshold: float
) -> PseudoLabels:
    """Argmax of the model's softmax on each prepared volume (its preprocessed grid, where
    training samples slices); pixels whose largest probability is below ``threshold`` get
    :data:`~contraseg.losses.IGNORE_LABEL`."""
    network = segmenter.networks[0]
    labels = []
    for case in cases:
        probs = slice_probabilities(network, case.image, segmenter.device, segmenter.batch_size)
        label = probs.argmax(axis=1).astype(np.uint8)
        label[probs.max(axis=1) < threshold] = IGNORE_LABEL
        labels.append(label)
    return PseudoLabels(
        tuple(c.case_id for c in cases), tuple(c.image for c in cases), tuple(labels)
    )


def batch_split(batch_size: int, fraction: float) -> tuple[int, int]:
    """(labelled, pseudo-labelled) slices per batch: ``fraction`` of the batch, rounded, with at
    least one of each."""
    if batch_size < 2:
        raise InputError(
            None,
            f"optim.batch_size: self-training needs at least 2 (a labelled and a "
            f"pseudo-labelled slice), got {batch_size}",
        )
    pseudo = min(max(round(fraction * batch_size), 1), batch_size - 1)
    return batch_size - pseudo, pseudo


class MixedSampler:
    """Batches of a labelled and a pseudo-labelled sampler, concatenated (labelled first);
    volume ids of the pseudo-labelled part follow those of the labelled volumes."""

    def __init__(self, labelled: RandomSliceSampler, pseudo: RandomSliceSampler) -> None:
        self.labelled = labelled
        self.pseudo = pseudo
        self.offset = len(labelled.pool.volumes)

    def sample(self) -> SliceBatch:
        a, b = self.labelled.sample(), self.pseudo.sample()
        assert a.labels is not None and b.labels is not None
        return SliceBatch(
            images=torch.cat([a.images, b.images]),
            volume_ids=torch.cat([a.volume_ids, b.volume_ids + self.offset]),
            partition_ids=torch.cat([a.partition_ids, b.partition_ids]),
            slice_ids=torch.cat([a.slice_ids, b.slice_ids]),
            labels=torch.cat([a.labels, b.labels]),
        )


class SelfTrainingRound(Finetuner):
    """A fine-tune on labelled + pseudo-labelled slices (rounds 1..N)."""

    stage = "self-training"

    def __init__(
        self,
        config: FinetuneRun,
        run_dir: str | Path,
        device: str,
        pseudo: PseudoLabels,
        speed: Speed | None = None,
    ) -> None:
        super().__init__(config, run_dir, device, speed)
        self.pseudo = pseudo

    def train_sampler(self, train: list[PreparedCase], split: Split) -> SliceSource:
        check_unseen([*self.train_ids, *self.pseudo.case_ids], split.test)
        ft = self.config.finetune
        n_labelled, n_pseudo = batch_split(self.config.optim.batch_size, ft.pseudo_fraction)
        labelled = RandomSliceSampler(
            self.slice_pool([case.image for case in train], [case.label for case in train]),
            n_labelled,
            self.sample_generator,
        )
        pseudo = RandomSliceSampler(
            self.slice_pool(list(self.pseudo.images), list(self.pseudo.labels)),
            n_pseudo,
            self.sample_generator,
        )
        return MixedSampler(labelled, pseudo)

    def targets(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return split_ignored(labels)


def _rounds(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("round-*") if (p / MARKER).is_file())


def run_self_training(
    config: FinetuneRun,
    out: str | Path,
    device: str = "auto",
    fresh: bool = False,
    speed: Speed | None = None,
) -> Path:
    """Round 0 and ``finetune.self_training_rounds`` self-training rounds in ``out``."""
    out = fileio.check_out_dir(out)
    ft = config.finetune
    if ft.self_training_rounds < 1:
        raise ValueError("run_self_training needs finetune.self_training_rounds >= 1")
    batch_split(config.optim.batch_size, ft.pseudo_fraction)  # refused before anything runs
    lock = RunLock(out)
    created = claim_run_dir(out, lock)
    try:
        if fresh:
            for folder in _rounds(out):
                shutil.rmtree(folder)
            for name in PRODUCTS:
                (out / name).unlink(missing_ok=True)
        fresh_marker = not (out / MARKER).exists()
        fileio.write_text(out / MARKER, "contraseg self-training run directory\n")
        try:
            prepared, split = load_dataset(config.data)
            _, labelled = split.choose(ft.labelled_volumes, ft.combination, ft.train, ft.val)
            if (config.model.num_classes or prepared.num_classes) > IGNORE_LABEL:
                raise InputError(
                    None, f"self-training handles up to {IGNORE_LABEL} classes (uint8 label maps)"
                )
            cases = require_cases(prepared, split, unlabelled_pool(split, labelled))
            previous = Finetuner(config, out / "round-0", device, speed).run()
        except BaseException:
            if fresh_marker and not _rounds(out):  # a failed start leaves nothing
                (out / MARKER).unlink(missing_ok=True)
                lock.release()
                remove_empty(created)
            raise
        history = [_round_record(previous, None)]
        for number in range(1, ft.self_training_rounds + 1):
            segmenter = Segmenter.from_pretrained(previous, device=device)
            pseudo = pseudo_label(segmenter, cases, ft.pseudo_threshold)
            run_dir = out / f"round-{number}"
            previous = SelfTrainingRound(config, run_dir, device, pseudo, speed).run()
            history.append(_round_record(previous, pseudo))
        for name in ("weights.safetensors", "model.json"):
            with fileio.atomic_path(out / name) as tmp:
                shutil.copyfile(previous / name, tmp)
        save_config(config, out / "config.yaml")
        fileio.write_json(out / "self_training.json", {"rounds": history})
    finally:
        lock.release()
    dice = history[-1]["best_val_dice"]
    selection = "no validation" if dice is None else f"best validation Dice {dice:.4f}"
    print(
        f"self-training: {ft.self_training_rounds} round(s) done ({selection} in the last); "
        f"model bundle in {out}; predict with `contraseg predict -m {out} -i INPUT -o OUTPUT`"
    )
    return out


def _round_record(run_dir: Path, pseudo: PseudoLabels | None) -> dict[str, object]:
    provenance = read_bundle(run_dir).provenance
    return {
        "run": run_dir.name,
        "best_val_dice": provenance.best_val_dice,
        "train_cases": list(provenance.train_cases),
        "pseudo_cases": [] if pseudo is None else list(pseudo.case_ids),
        "pseudo_kept_fraction": None if pseudo is None else pseudo.kept_fraction,
    }
