"""The figures of a grid: what they plot equals the statistics, and the PCA a hand computation."""

from __future__ import annotations

import sys
import types

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.container import BarContainer
from PIL import Image

from contraseg.report import figures
from contraseg.report.stats import aggregate, class_score


@pytest.fixture
def drawn(monkeypatch):
    """The figures handed to ``_save``, kept open for inspection (and still written)."""
    kept = []

    def keep(fig, path):
        kept.append(fig)
        fig.savefig(path, format="png")

    monkeypatch.setattr(figures, "_save", keep)
    yield kept
    for fig in kept:
        plt.close(fig)


def test_dice_vs_labelled_plots_the_table_cells(sample_rows, tmp_path, drawn):
    sample_rows.reverse()  # "all" first in the input: still last on the axis
    figures.dice_vs_labelled(sample_rows, tmp_path / "dice.png")
    (ax,) = drawn[0].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "all"]
    containers = ax.containers
    assert [c.get_label() for c in containers] == ["random", "G^D + L^D", "G^D"]
    cells = aggregate(sample_rows)
    for container in containers:
        line, _, (bars,) = container
        mine = [c for c in cells if c.init == container.get_label()]
        assert np.allclose(line.get_ydata(), [c.mean for c in mine])
        # error bars span mean -+ sample std
        spans = [segment[:, 1] for segment in bars.get_segments()]
        assert np.allclose([hi - lo for lo, hi in spans], [2 * c.std for c in mine])
    assert Image.open(tmp_path / "dice.png").size[0] > 100


def test_dice_per_structure_bars_are_class_means(sample_rows, tmp_path, drawn):
    figures.dice_per_structure(sample_rows, tmp_path / "structures.png")
    axes = drawn[0].axes
    assert [ax.get_title() for ax in axes] == [
        "1 labelled volume",
        "2 labelled volumes",
        "all labelled volumes",
    ]
    lv = {
        (c.init, c.labelled_volumes): c.mean
        for c in aggregate(sample_rows, class_score("per_class_dice", "LV"))
    }
    for ax, count in zip(axes, (1, 2, "all"), strict=True):
        assert [t.get_text() for t in ax.get_xticklabels()] == ["RV", "Myo", "LV"]
        bar_groups = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert [b.get_label() for b in bar_groups] == ["random", "G^D", "G^D + L^D"]
        for bars in bar_groups:
            assert bars.patches[2].get_height() == pytest.approx(lv[bars.get_label(), count])


def hand_pca(x):
    """Eigenvectors of the covariance, oriented with the largest loading positive."""
    centred = x - x.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    order = np.argsort(values)[::-1][:2]
    projection = []
    for k in order:
        v = vectors[:, k]
        v = v if v[np.argmax(np.abs(v))] > 0 else -v
        projection.append(centred @ v)
    return np.stack(projection, axis=1), values[order] / values.sum()


def test_pca_equals_the_covariance_eigenvectors(sample_embeddings):
    x, _ = sample_embeddings
    projection, ratios = figures.pca_2d(x)
    expected, expected_ratios = hand_pca(x)
    assert np.allclose(projection, expected, atol=1e-9)
    assert np.allclose(ratios, expected_ratios)
    flat, flat_ratios = figures.pca_2d(x[:, :1])
    assert np.allclose(flat[:, 1], 0) and flat_ratios[1] == 0
    with pytest.raises(ValueError, match="N >= 2"):
        figures.pca_2d(x[:1])


def test_projection_without_scikit_learn_leaves_out_tsne(
    sample_embeddings, tmp_path, drawn, monkeypatch
):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    x, partitions = sample_embeddings
    note = figures.embedding_projection(x, partitions, tmp_path / "p.png", title="G^D")
    assert note == figures.TSNE_MISSING
    (ax,) = drawn[0].axes
    assert ax.get_title().startswith("PCA (")
    assert len(ax.collections) == 3  # one scatter per partition
    assert note in drawn[0]._suptitle.get_text()
    # the points are the PCA projection
    projection, _ = figures.pca_2d(x)
    assert np.allclose(ax.collections[1].get_offsets(), projection[partitions == 1])


def test_projection_draws_tsne_when_scikit_learn_is_importable(
    sample_embeddings, tmp_path, drawn, monkeypatch
):
    calls = []

    class TSNE:  # stands in for sklearn.manifold.TSNE, which contraseg does not depend on
        def __init__(self, **kwargs):
            calls.append(kwargs)

        def fit_transform(self, x):
            return x[:, :2] * 2

    manifold = types.ModuleType("sklearn.manifold")
    manifold.TSNE = TSNE
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.manifold", manifold)
    x, partitions = sample_embeddings
    assert figures.embedding_projection(x, partitions, tmp_path / "p.png") is None
    assert [ax.get_title() for ax in drawn[0].axes][1] == "t-SNE"
    assert calls == [
        {"n_components": 2, "perplexity": 19.666666666666668, "init": "pca", "random_state": 0}
    ]
    assert np.allclose(drawn[0].axes[1].collections[0].get_offsets(), x[partitions == 0, :2] * 2)


def test_projection_refuses_partitions_that_do_not_fit(sample_embeddings, tmp_path):
    x, partitions = sample_embeddings
    for bad in (partitions[:-1], partitions.astype(float)):
        with pytest.raises(ValueError, match="partitions must be 60 integer ids"):
            figures.embedding_projection(x, bad, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_colours_cycle_past_ten_initialisations(sample_rows, tmp_path, drawn):
    rows = [{**r, "init": f"{r['init']} #{k}"} for k in range(4) for r in sample_rows]
    figures.dice_vs_labelled(rows, tmp_path / "many.png")
    assert len(drawn[0].axes[0].containers) == 12
