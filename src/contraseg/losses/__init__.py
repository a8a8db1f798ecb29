"""Contrastive (global, local) and segmentation losses, as pure functions, and the gather that
lets data-parallel ranks compute the contrastive losses on their joint batch.

Slow loop implementations (test oracles) are in ``tests/support/loop_oracles.py``.
"""

from contraseg.losses.distributed import (
    all_gather_rows,
    all_gather_with_grad,
    gather_contrastive_batch,
    gather_ids,
)
from contraseg.losses.global_contrastive import (
    GLOBAL_STRATEGIES,
    GlobalPairs,
    global_chance_level,
    global_contrastive_loss,
    global_loss_from_pairs,
    global_pair_masks,
    global_pairs,
)
from contraseg.losses.local_contrastive import (
    LOCAL_STRATEGIES,
    check_neg_index,
    local_chance_level,
    local_contrastive_loss,
    local_loss_from_pairs,
    local_pairs,
)
from contraseg.losses.segmentation import (
    IGNORE_LABEL,
    SEGMENTATION_LOSSES,
    official_class_weights,
    one_hot,
    segmentation_loss,
    soft_dice_loss,
    split_ignored,
    weighted_cross_entropy,
)

__all__ = [
    "GLOBAL_STRATEGIES",
    "IGNORE_LABEL",
    "LOCAL_STRATEGIES",
    "SEGMENTATION_LOSSES",
    "GlobalPairs",
    "all_gather_rows",
    "all_gather_with_grad",
    "check_neg_index",
    "gather_contrastive_batch",
    "gather_ids",
    "global_chance_level",
    "global_contrastive_loss",
    "global_loss_from_pairs",
    "global_pair_masks",
    "global_pairs",
    "local_chance_level",
    "local_contrastive_loss",
    "local_loss_from_pairs",
    "local_pairs",
    "official_class_weights",
    "one_hot",
    "segmentation_loss",
    "soft_dice_loss",
    "split_ignored",
    "weighted_cross_entropy",
]
