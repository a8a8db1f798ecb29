"""Scores of segmentations: metrics, a run on its test split, folder against folder."""

from contraseg.evaluation.evaluate import (
    CaseScore,
    EvaluationSummary,
    evaluate_folders,
    evaluate_run,
    mean_case_dice,
    score_case,
)
from contraseg.evaluation.metrics import dice_per_class, hd95_per_class, summarise_hd95

__all__ = [
    "CaseScore",
    "EvaluationSummary",
    "dice_per_class",
    "evaluate_folders",
    "evaluate_run",
    "hd95_per_class",
    "mean_case_dice",
    "score_case",
    "summarise_hd95",
]
