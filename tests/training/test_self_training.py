"""Self-training: pseudo-labels, the unlabelled pool, mixed batches, never a test case."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from contraseg.config import FinetuneRun
from contraseg.data.dataset import load_dataset
from contraseg.data.splits import LabelledSet, Split
from contraseg.errors import InputError
from contraseg.inference import Segmenter
from contraseg.losses import IGNORE_LABEL
from contraseg.training.self_training import (
    MixedSampler,
    PseudoLabels,
    SelfTrainingRound,
    batch_split,
    check_unseen,
    pseudo_label,
    unlabelled_pool,
)
from contraseg.training.stages import run_finetune

SELF_TRAINING = (
    "optim.iterations=2",
    "optim.batch_size=4",
    "finetune.val_every=2",
    "finetune.self_training_rounds=1",
    "finetune.pseudo_threshold=0.0",
)


def _split() -> Split:
    return Split(
        pretrain=("a", "b", "c", "d", "t"),
        pretrain_val=(),
        test=("t", "u"),
        labelled={},
        benchmark=None,
    )


def test_the_pool_leaves_out_test_validation_and_labelled_cases():
    assert unlabelled_pool(_split(), LabelledSet(train=("a",), val=("b",))) == ("c", "d")
    with pytest.raises(InputError, match="nothing to pseudo-label"):
        unlabelled_pool(_split(), LabelledSet(train=("a", "b"), val=("c", "d")))


def test_a_test_case_in_training_data_is_refused():
    check_unseen(["a", "c"], ["t", "u"])
    with pytest.raises(InputError, match=r"test cases \['t'\]"):
        check_unseen(["a", "t"], ["t", "u"])


def test_batches_hold_both_kinds_of_slices():
    assert batch_split(20, 0.5) == (10, 10)
    assert batch_split(4, 0.01) == (3, 1)
    assert batch_split(4, 1.0) == (1, 3)
    with pytest.raises(InputError, match="at least 2"):
        batch_split(1, 0.5)


class _FixedSoftmax(nn.Module):
    """Logits whose softmax is the given per-pixel probabilities for every slice."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.logits = probs.log()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, -1, -1)


def test_pseudo_labels_keep_only_confident_pixels():
    probs = torch.tensor([[0.7, 0.2], [0.9, 0.45]])  # class 0 probabilities of a 2 x 2 image
    probs = torch.stack([probs, 1 - probs])[None]  # (1, 2, 2, 2)
    segmenter = SimpleNamespace(
        networks=[_FixedSoftmax(probs)], device=torch.device("cpu"), batch_size=2
    )
    case = SimpleNamespace(case_id="c", image=np.zeros((3, 1, 2, 2), np.float32))
    pseudo = pseudo_label(segmenter, [case], threshold=0.75)
    assert pseudo.case_ids == ("c",)
    assert pseudo.labels[0].dtype == np.uint8
    assert pseudo.labels[0].tolist() == [[[IGNORE_LABEL, 1], [0, IGNORE_LABEL]]] * 3
    assert pseudo.kept_fraction == pytest.approx(0.5)


@pytest.fixture(scope="module")
def self_training_run(tmp_path_factory, tiny_config):
    config = tiny_config(FinetuneRun, *SELF_TRAINING)
    return config, run_finetune(config, tmp_path_factory.mktemp("st") / "run")


def test_self_training_writes_rounds_and_a_model_bundle(self_training_run):
    _, out = self_training_run
    for name in ("round-0", "round-1"):
        assert (out / name / "model.json").is_file()
    assert (out / "weights.safetensors").read_bytes() == (
        out / "round-1" / "weights.safetensors"
    ).read_bytes()
    segmenter = Segmenter.from_pretrained(out, device="cpu")
    assert segmenter.bundle.architecture.num_classes == 4
    record = json.loads((out / "self_training.json").read_text())["rounds"]
    assert [r["run"] for r in record] == ["round-0", "round-1"]
    assert record[1]["pseudo_kept_fraction"] == 1.0  # threshold 0 keeps every pixel


def test_self_training_never_trains_on_a_test_case(self_training_run):
    config, out = self_training_run
    _, split = load_dataset(config.data)
    assert split.test
    for record in json.loads((out / "self_training.json").read_text())["rounds"]:
        trained = {*record["train_cases"], *record["pseudo_cases"]}
        assert trained and not trained & set(split.test)
    pseudo = json.loads((out / "self_training.json").read_text())["rounds"][1]["pseudo_cases"]
    assert set(pseudo) <= set(split.pretrain)


def test_a_round_refuses_pseudo_labels_of_a_test_case(tiny_config, tmp_path):
    config = tiny_config(FinetuneRun, *SELF_TRAINING)
    prepared, split = load_dataset(config.data)
    case = prepared.cases[split.test[0]]
    labels = np.zeros(case.image.shape[:1] + case.image.shape[2:], np.uint8)
    pseudo = PseudoLabels((case.case_id,), (case.image,), (labels,))
    with pytest.raises(InputError, match="test set must stay unseen"):
        SelfTrainingRound(config, tmp_path / "round", "cpu", pseudo).setup()


def test_mixed_batches_put_labelled_slices_first_and_ignore_marks(tiny_config, tmp_path):
    config = tiny_config(FinetuneRun, *SELF_TRAINING, "finetune.pseudo_fraction=0.25")
    prepared, split = load_dataset(config.data)
    pool = [prepared.cases[c] for c in split.pretrain[-2:]]
    labels = tuple(
        np.full(c.image.shape[:1] + c.image.shape[2:], IGNORE_LABEL, np.uint8) for c in pool
    )
    pseudo = PseudoLabels(tuple(c.case_id for c in pool), tuple(c.image for c in pool), labels)
    trainer = SelfTrainingRound(config, tmp_path / "round", "cpu", pseudo)
    trainer.setup()
    assert isinstance(trainer.sampler, MixedSampler)
    batch = trainer.sampler.sample()
    assert batch.images.shape[0] == 4
    assert torch.all(batch.labels[:3] < 4) and torch.all(batch.labels[3] == IGNORE_LABEL)
    assert torch.all(batch.volume_ids[3:] >= 1)  # after the one labelled volume
    target, ignore = trainer.targets(batch.labels)
    assert torch.equal(ignore, batch.labels == IGNORE_LABEL)
    assert int(target.max()) < 4


def test_a_failed_start_leaves_nothing(tiny_config, tmp_path):
    config = tiny_config(FinetuneRun, *SELF_TRAINING, "optim.batch_size=1")
    with pytest.raises(InputError, match="at least 2"):
        run_finetune(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    bad = tiny_config(FinetuneRun, *SELF_TRAINING, "finetune.combination=c9")
    with pytest.raises(InputError, match="no labelled set 'tr1/c9'"):
        run_finetune(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
