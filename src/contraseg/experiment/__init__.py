"""Grids of pre-training and fine-tuning runs, aggregated like the paper's tables."""

from contraseg.experiment.stats import (
    ALL,
    BASELINE,
    Cell,
    Comparison,
    PairedStats,
    aggregate,
    class_score,
    compare_to_baseline,
    markdown_table,
    mean_test_dice,
    outcome,
    paired_statistics,
    results_csv,
    summary_grid,
    summary_markdown,
    write_results_csv,
)

__all__ = [
    "ALL",
    "BASELINE",
    "Cell",
    "Comparison",
    "PairedStats",
    "aggregate",
    "class_score",
    "compare_to_baseline",
    "markdown_table",
    "mean_test_dice",
    "outcome",
    "paired_statistics",
    "results_csv",
    "summary_grid",
    "summary_markdown",
    "write_results_csv",
]
