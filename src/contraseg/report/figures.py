"""The demo's figures, drawn with matplotlib's non-interactive backend into PNG files."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from contraseg.fileio import atomic_path
from contraseg.report.markdown import dice_groups

# One colour per initialisation, kept across figures.
COLOURS = ("#7f7f7f", "#1f77b4", "#d62728", "#2ca02c", "#9467bd")
LABEL_COLOURS = np.array(
    [[0, 0, 0, 0], [0.2, 0.4, 1.0, 0.55], [1.0, 0.8, 0.1, 0.55], [1.0, 0.2, 0.2, 0.55]]
)


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window <= 1:
        return values
    kernel = np.ones(window) / window
    return np.convolve(
        np.pad(values, (window // 2, window - 1 - window // 2), mode="edge"), kernel, "valid"
    )


def loss_curves(runs: Mapping[str, Path], path: Path) -> None:
    """Pre-training loss against iteration, each beside its chance level (dashed)."""
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (title, run_dir) in zip(axes[0], runs.items(), strict=True):
        rows = [r for r in read_metrics(run_dir) if "loss" in r]
        it = np.array([r["iteration"] for r in rows])
        loss = np.array([r["loss"] for r in rows])
        ax.plot(it, loss, color="#bbbbbb", lw=0.8, label="loss")
        ax.plot(it, _smooth(loss, 9), color=COLOURS[1], lw=1.8, label="loss (smoothed)")
        if rows and "chance" in rows[0]:
            ax.plot(it, [r["chance"] for r in rows], "k--", lw=1.2, label="chance level")
        ax.set(title=title, xlabel="iteration", ylabel="loss")
        ax.legend(frameon=False, fontsize=8)
    _save(fig, path)


def validation_curves(
    panels: Mapping[str, Mapping[str, Path]], path: Path, columns: int = 3
) -> None:
    """Validation Dice against fine-tuning iteration; one panel per labelled set (``columns``
    per row), one line per initialisation (all fine-tuned on the same labelled volumes)."""
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_axis_off()
    for ax, (title, runs) in zip(axes.flat, panels.items(), strict=False):
        for colour, (init, run_dir) in zip(COLOURS, runs.items(), strict=False):
            logged = [r for r in read_metrics(run_dir) if "val_dice" in r]
            ax.plot(
                [r["iteration"] for r in logged],
                [r["val_dice"] for r in logged],
                marker="o",
                ms=3,
                color=colour,
                label=init,
            )
        ax.set(title=title, xlabel="fine-tuning iteration", ylabel="validation Dice", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=8)
    _save(fig, path)


def dice_vs_labelled(rows: Sequence[Mapping[str, object]], path: Path) -> None:
    """Test Dice against the number of labelled volumes, mean +- std over labelled sets."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    groups = dice_groups(rows)
    inits = list(groups)
    counts = sorted({n for by_count in groups.values() for n in by_count})
    for i, (colour, init) in enumerate(zip(COLOURS, inits, strict=False)):
        values = [groups[init].get(n, [float("nan")]) for n in counts]
        means = [np.mean(v) for v in values]
        stds = [np.std(v) for v in values]
        offset = (i - (len(inits) - 1) / 2) * 0.04
        ax.errorbar(
            np.array(counts) + offset,
            means,
            yerr=stds,
            marker="o",
            capsize=3,
            color=colour,
            label=init,
        )
    ax.set(xlabel="labelled volumes", ylabel="test Dice (mean over volumes)", xticks=counts)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    _save(fig, path)


def overlays(
    image_slices: Sequence[np.ndarray],
    truth_slices: Sequence[np.ndarray],
    predictions: Mapping[str, Sequence[np.ndarray]],
    path: Path,
) -> None:
    """Rows: test slices. Columns: image, ground truth, then each initialisation's prediction."""
    columns = ["image", "ground truth", *predictions]
    fig, axes = plt.subplots(
        len(image_slices),
        len(columns),
        figsize=(2.2 * len(columns), 2.2 * len(image_slices)),
        squeeze=False,
    )
    for row, image in enumerate(image_slices):
        maps = [None, truth_slices[row], *(p[row] for p in predictions.values())]
        for col, (title, labels) in enumerate(zip(columns, maps, strict=True)):
            ax = axes[row][col]
            ax.imshow(image, cmap="gray")
            if labels is not None:
                colours = LABEL_COLOURS[np.clip(labels, 0, len(LABEL_COLOURS) - 1)]
                ax.imshow(colours)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=9)
    _save(fig, path)
