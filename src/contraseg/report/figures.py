"""The demo's figures, drawn with matplotlib's non-interactive backend into PNG files."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from contraseg.fileio import atomic_path
from contraseg.report.stats import (
    aggregate,
    class_score,
    init_order,
    labelled_order,
    labelled_phrase,
    labelled_volumes,
)

# One colour per initialisation, kept across figures (cycled past ten).
COLOURS = (
    "#7f7f7f",
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
)
# Label overlays: transparent background, then blue, yellow, red (ACDC's RV, Myo, LV), then
# the tab10 colours for datasets with more classes (MMWHS has 7).
LABEL_COLOURS = np.array(
    [
        [0, 0, 0, 0],
        [0.2, 0.4, 1.0, 0.55],
        [1.0, 0.8, 0.1, 0.55],
        [1.0, 0.2, 0.2, 0.55],
        *([*plt.get_cmap("tab10")(k)[:3], 0.55] for k in (2, 4, 5, 6, 7, 8, 9)),
    ]
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


def _panels(count: int, columns: int, width: float, height: float) -> tuple[plt.Figure, list]:
    """A figure of ``count`` panels, ``columns`` per row; the unused ones hidden."""
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_axis_off()
    return fig, list(axes.flat[:count])


def loss_curves(runs: Mapping[str, Path], path: Path, columns: int = 4) -> None:
    """Pre-training loss against iteration, each beside its chance level (dashed); one panel
    per run, ``columns`` per row."""
    fig, axes = _panels(len(runs), columns, 5.0, 3.6)
    for ax, (title, run_dir) in zip(axes, runs.items(), strict=True):
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
    fig, axes = _panels(len(panels), columns, 4.4, 3.4)
    for ax, (title, runs) in zip(axes, panels.items(), strict=True):
        for colour, (init, run_dir) in zip(itertools.cycle(COLOURS), runs.items(), strict=False):
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
    """Test Dice against the number of labelled volumes, one line per initialisation: the cells
    of the summary table (mean ± sample std over labelled sets and seeds), ``all`` last."""
    cells = aggregate(rows)
    counts = sorted({c.labelled_volumes for c in cells}, key=labelled_order)
    inits = list(dict.fromkeys(c.init for c in cells))
    fig, ax = plt.subplots(figsize=(1.2 * len(counts) + 3.5, 3.6))
    for i, (colour, init) in enumerate(zip(itertools.cycle(COLOURS), inits, strict=False)):
        mine = [c for c in cells if c.init == init]
        offset = (i - (len(inits) - 1) / 2) * 0.04
        ax.errorbar(
            [counts.index(c.labelled_volumes) + offset for c in mine],
            [c.mean for c in mine],
            yerr=[0.0 if c.n < 2 else c.std for c in mine],
            marker="o",
            capsize=3,
            color=colour,
            label=init,
        )
    ax.set_xticks(range(len(counts)), [str(n) for n in counts])
    ax.set(xlabel="labelled volumes", ylabel="test Dice (mean ± std over runs)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    _save(fig, path)


def dice_per_structure(rows: Sequence[Mapping[str, object]], path: Path) -> None:
    """Test Dice per structure: one panel per number of labelled volumes, grouped bars (one per
    initialisation) for each class, mean ± sample std over labelled sets and seeds."""
    classes = list(dict.fromkeys(c for r in rows for c in r["per_class_dice"]))  # type: ignore[attr-defined]
    cells = {
        (name, c.init, c.labelled_volumes): c
        for name in classes
        for c in aggregate(rows, class_score("per_class_dice", name))
    }
    counts = sorted({labelled_volumes(r) for r in rows}, key=labelled_order)
    inits = init_order(rows)
    fig, axes = plt.subplots(
        1, len(counts), figsize=(0.5 * len(classes) * len(inits) + 2.5, 3.6), squeeze=False
    )
    width = 0.8 / len(inits)
    for ax, count in zip(axes[0], counts, strict=True):
        for i, (colour, init) in enumerate(zip(itertools.cycle(COLOURS), inits, strict=False)):
            bars = [cells.get((name, init, count)) for name in classes]
            ax.bar(
                np.arange(len(classes)) + (i - (len(inits) - 1) / 2) * width,
                [math.nan if c is None else c.mean for c in bars],
                width,
                yerr=[0.0 if c is None or c.n < 2 else c.std for c in bars],
                capsize=2,
                color=colour,
                label=init,
            )
        ax.set_xticks(range(len(classes)), classes)
        ax.set(title=labelled_phrase(count), ylabel="test Dice", ylim=(0, 1))
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(frameon=False, fontsize=8)
    _save(fig, path)


def pca_2d(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (N, 2) projection on the first two principal axes and their explained-variance
    ratios, from the SVD of the centred data. Each axis is oriented so that its largest
    loading is positive, which makes the picture independent of the SVD's sign choice."""
    x = np.asarray(embeddings, dtype=float)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"embeddings must be an (N, D) array with N >= 2, got {x.shape}")
    centred = x - x.mean(axis=0)
    _, singular, directions = np.linalg.svd(centred, full_matrices=False)
    top = directions[:2]
    top = top * np.sign(top[np.arange(len(top)), np.abs(top).argmax(axis=1)])[:, None]
    projection = centred @ top.T
    total = float(np.sum(singular**2))
    ratios = singular[:2] ** 2 / total if total > 0 else np.zeros(len(singular[:2]))
    if projection.shape[1] < 2:  # a single feature: a flat second axis
        projection = np.pad(projection, ((0, 0), (0, 2 - projection.shape[1])))
        ratios = np.pad(ratios, (0, 2 - len(ratios)))
    return projection, ratios


def _tsne_2d(embeddings: np.ndarray) -> np.ndarray | None:
    """t-SNE from scikit-learn, which contraseg does not depend on: None when it is missing."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        return None
    perplexity = min(30.0, max(1.0, (len(embeddings) - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0)
    return np.asarray(tsne.fit_transform(np.asarray(embeddings, dtype=float)))


TSNE_MISSING = "t-SNE panel left out: scikit-learn is not installed"


def embedding_projection(
    embeddings: np.ndarray, partitions: np.ndarray, path: Path, title: str = ""
) -> str | None:
    """Embeddings (N, D) projected to 2-D and coloured by their integer partition ids: PCA
    always, t-SNE beside it when scikit-learn is importable. Returns a note for the report when
    the t-SNE panel was left out, else None."""
    partitions = np.asarray(partitions)
    if partitions.shape != (len(embeddings),) or not np.issubdtype(partitions.dtype, np.integer):
        raise ValueError(f"partitions must be {len(embeddings)} integer ids, got {partitions!r}")
    pca, ratios = pca_2d(embeddings)
    tsne = _tsne_2d(embeddings)
    panels = {f"PCA ({ratios[0]:.0%} + {ratios[1]:.0%} of the variance)": pca}
    if tsne is not None:
        panels["t-SNE"] = tsne
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    ids = np.unique(partitions)
    cmap = plt.get_cmap("tab10" if len(ids) <= 10 else "tab20")
    for ax, (name, points) in zip(axes[0], panels.items(), strict=True):
        for k, pid in enumerate(ids):
            chosen = partitions == pid
            ax.scatter(*points[chosen].T, s=12, color=cmap(k % cmap.N), label=f"partition {pid}")
        ax.set(title=name, xticks=[], yticks=[])
    axes[0][-1].legend(frameon=False, fontsize=7, markerscale=1.5, loc="best")
    note = None if tsne is not None else TSNE_MISSING
    if title or note:
        fig.suptitle("\n".join(t for t in (title, note) if t), fontsize=10)
    _save(fig, path)
    return note


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
