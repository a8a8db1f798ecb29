"""The finished fine-tuning runs of a plan as result rows, ``results.csv`` and ``table.md``.

A row is what :mod:`contraseg.report.stats` reads: the run's grid keys, its test scores (from
``evaluation/summary.json``), its model selection (from ``model.json``) and its wall time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from contraseg import fileio
from contraseg.errors import InputError
from contraseg.experiment.execute import recorded_seconds
from contraseg.experiment.plan import Plan, run_state
from contraseg.inference import read_bundle
from contraseg.report import stats

__all__ = ["collect_rows", "comparison_table", "table_markdown", "write_tables"]

Row = dict[str, object]


def _row(plan: Plan, name: str) -> Row:
    run = plan.run(name)
    run_dir = plan.out / name
    path = run_dir / "evaluation" / "summary.json"
    try:
        summary = json.loads(path.read_text())
        classes = summary["classes"]
        provenance = read_bundle(run_dir).provenance
        return {
            "run": name,
            "init": run.init,
            "labelled_volumes": run.labelled_volumes,
            "combination": run.combination,
            "seed": run.seed,
            **run.keys,
            "test_dice": float(summary["mean_dice"]),
            "per_class_dice": {c: float(v["dice"]) for c, v in classes.items()},
            "per_class_hd95_mm": {c: v["hd95"] for c, v in classes.items()},
            "best_val_dice": provenance.best_val_dice,
            "best_iteration": provenance.best_iteration,
            "iterations": provenance.iterations,
            "wall_s": recorded_seconds(run_dir),
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(path, f"cannot read the run's scores: {fileio.one_line(err)}") from None


def collect_rows(plan: Plan) -> list[Row]:
    """One row per finished fine-tuning run, in plan order."""
    return [
        _row(plan, run.name)
        for run in plan.level("finetune")
        if run_state(run, plan.out) == "finished"
    ]


def _p(value: float) -> str:
    return "-" if value != value else ("< 0.001" if value < 0.001 else f"{value:.3g}")


def comparison_table(comparisons: Sequence[stats.Comparison]) -> tuple[list[str], list[list[str]]]:
    """One line per (initialisation, labelled volumes) against the baseline."""
    header = [
        "initialisation",
        "labelled volumes",
        "pairs",
        "mean difference",
        "95% bootstrap CI",
        "Wilcoxon p",
        "outcome",
    ]
    body = []
    for c in comparisons:
        interval = "-" if c.ci_low != c.ci_low else f"{c.ci_low:+.3f} .. {c.ci_high:+.3f}"
        mean = "-" if c.mean_difference != c.mean_difference else f"{c.mean_difference:+.3f}"
        body.append(
            [
                f"{c.init} - {c.baseline}",
                str(c.labelled_volumes),
                str(c.n_pairs),
                mean,
                interval,
                _p(c.p_value),
                c.outcome,
            ]
        )
    return header, body


def class_names(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(c for r in rows for c in r["per_class_dice"]))  # type: ignore[attr-defined]


def table_markdown(plan: Plan, rows: Sequence[Row], figures: Sequence[tuple[str, str]] = ()) -> str:
    """``table.md``: the paper-style table (mean ± std over labelled sets and seeds), the
    paired comparisons with the baseline, Dice per structure; ``figures`` (caption, relative
    path) are linked at the end."""
    grid = plan.grid
    total = len(plan.level("finetune"))
    lines = [f"# {grid.title or 'Experiment'}", ""]
    if grid.description:
        lines += [grid.description.strip(), ""]
    lines += [
        f"{len(rows)} of {total} fine-tuning runs finished. Test score: per test volume the "
        "mean foreground 3-D Dice, then the mean over test volumes; each cell is the mean ± "
        "sample std over labelled sets and seeds (n runs).",
        "",
        stats.summary_markdown(rows),
        "",
    ]
    if grid.baseline:
        comparisons = stats.compare_to_baseline(rows, grid.baseline)
        if comparisons:
            lines += [
                f"## Against {grid.baseline}",
                "",
                f"Paired over the runs that share a labelled set and a seed ({grid.baseline} "
                "and the initialisation on the same labelled volumes); interval and test as "
                "in docs/statistics.md.",
                "",
                stats.markdown_table(*comparison_table(comparisons)),
                "",
                *[f"- {c.verdict}" for c in comparisons],
                "",
            ]
    lines += ["## Dice per structure", ""]
    for name in class_names(rows):
        lines += [
            f"{name}:",
            "",
            stats.summary_markdown(rows, stats.class_score("per_class_dice", name)),
            "",
        ]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{caption}]({path})\n" for caption, path in figures]
    return "\n".join(lines)


def write_tables(plan: Plan, rows: Sequence[Row]) -> str:
    """``results.csv`` and ``table.md`` into the output folder; returns the markdown."""
    stats.write_results_csv(plan.out / stats.RESULTS_CSV, rows)
    text = table_markdown(plan, rows)
    fileio.write_text(plan.out / "table.md", text)
    return text
