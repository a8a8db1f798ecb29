"""Mixup in fine-tuning: the same lambda for images and labels, alpha -> 0 is no Mixup."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contraseg.config import FinetuneRun
from contraseg.data.mixup import mixup, sample_mixup
from contraseg.data.sampling import SliceBatch
from contraseg.losses import one_hot
from contraseg.training.checkpoint import load_weights
from contraseg.training.stages import Finetuner, run_finetune

NO_AUGMENT = ("augment.enabled=false", "optim.batch_size=4")


def test_sampled_weights_are_beta_draws_folded_above_one_half():
    lam, perm = sample_mixup(4000, 0.4, torch.Generator().manual_seed(0))
    assert lam.min() >= 0.5 and lam.max() <= 1.0
    assert sorted(perm.tolist()) == list(range(4000))
    # Beta(a, a) folded at 1/2: E[max(x, 1 - x)] = 1/2 + E|x - 1/2|; for a = 0.4 about 0.80
    reference = np.random.default_rng(1).beta(0.4, 0.4, 200_000)
    assert float(lam.mean()) == pytest.approx(np.maximum(reference, 1 - reference).mean(), abs=0.01)
    tiny, _ = sample_mixup(1000, 1e-9, torch.Generator().manual_seed(0))
    assert torch.all(tiny == 1.0)


def test_mixup_mixes_images_labels_and_ignore_masks():
    images = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    target = one_hot(torch.tensor([0, 1, 2]).view(3, 1, 1).expand(3, 2, 2), 3)
    ignore = torch.zeros(3, 2, 2, dtype=torch.bool)
    ignore[1, 0, 0] = True
    lam, perm = torch.tensor([1.0, 0.75, 0.5]), torch.tensor([2, 0, 1])
    mixed, mixed_target, mixed_ignore = mixup(images, target, lam, perm, ignore)
    assert mixed[:, 0, 0, 0].tolist() == [0.0, 0.75 * 1 + 0.25 * 0, 0.5 * 2 + 0.5 * 1]
    assert mixed_target[:, :, 0, 0].tolist() == [[1, 0, 0], [0.25, 0.75, 0], [0, 0.5, 0.5]]
    # a pixel is ignored where either source is: image 1 itself, and image 2 through partner 1
    assert mixed_ignore[:, 0, 0].tolist() == [False, True, True]
    assert not mixed_ignore[:, 1, 1].any()


def _fixed_batch(device: torch.device) -> SliceBatch:
    """Image i is the constant i + 1 and its label map the class i, so a mixed image tells
    which classes, and how much of each, its mixed label must hold."""
    images = (torch.arange(4.0, device=device) + 1).view(4, 1, 1, 1).expand(4, 1, 32, 32)
    labels = torch.arange(4, device=device).view(4, 1, 1).expand(4, 32, 32)
    zeros = torch.zeros(4, dtype=torch.long, device=device)
    return SliceBatch(images.clone(), zeros, zeros, zeros, labels.clone())


def _inputs_of_one_step(trainer: Finetuner) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images into the network, target into the loss, loss) of one compute_loss call, on the
    CPU."""
    seen: dict[str, torch.Tensor] = {}
    trainer.sampler.sample = lambda: _fixed_batch(trainer.device)
    hook = trainer.unet.register_forward_pre_hook(lambda m, args: seen.update(images=args[0]))
    loss_fn = trainer.loss_fn

    def recording(logits, target, ignore=None):
        seen["target"] = target
        return loss_fn(logits, target, ignore)

    trainer.loss_fn = recording
    loss, _ = trainer.compute_loss(1)
    hook.remove()
    return seen["images"].cpu(), seen["target"].cpu(), loss.cpu()


def test_labels_are_mixed_with_the_images_lambda(tiny_config, tmp_path):
    trainer = Finetuner(tiny_config(FinetuneRun, *NO_AUGMENT, "finetune.mixup_alpha=0.4"), tmp_path)
    trainer.setup()
    images, target, _ = _inputs_of_one_step(trainer)
    assert target.shape == (4, 4, 32, 32)
    torch.testing.assert_close(target.sum(dim=1), torch.ones(4, 32, 32))
    # lam * (c_i, e_i) + (1 - lam) * (c_j, e_j): the image is its label's mixture of constants
    constants = torch.arange(4.0) + 1
    torch.testing.assert_close(images[:, 0], torch.einsum("bkhw,k->bhw", target, constants))
    largest = target.amax(dim=1)
    assert torch.all(largest >= 0.5)
    assert torch.any(largest < 1), "alpha 0.4 should mix some images"
    assert torch.all((target > 0).sum(dim=1) <= 2)  # two sources at most


def test_alpha_towards_zero_is_no_mixup(tiny_config, tmp_path):
    results = []
    for alpha in (0.0, 1e-9):
        config = tiny_config(FinetuneRun, *NO_AUGMENT, f"finetune.mixup_alpha={alpha}")
        trainer = Finetuner(config, tmp_path / str(alpha))
        trainer.setup()
        results.append(_inputs_of_one_step(trainer))
    (images_off, target_off, loss_off), (images_on, target_on, loss_on) = results
    assert torch.equal(images_off, images_on)
    assert torch.equal(one_hot(target_off, 4), target_on)
    torch.testing.assert_close(loss_off, loss_on)


def test_finetune_with_mixup_completes(tiny_config, tmp_path):
    config = tiny_config(
        FinetuneRun, "optim.iterations=2", "optim.batch_size=4", "finetune.mixup_alpha=0.2"
    )
    run_dir = run_finetune(config, tmp_path / "ft")
    weights = load_weights(run_dir / "weights.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert (run_dir / "model.json").is_file()
