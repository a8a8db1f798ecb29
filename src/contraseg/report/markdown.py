"""The demo's ``report.md``: the results table, computed from the rows of ``results.json``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from contraseg import fileio

Row = Mapping[str, object]


def dice_groups(rows: Sequence[Row]) -> dict[str, dict[int, list[float]]]:
    """init -> number of labelled volumes -> test Dice of each run, in the rows' order."""
    groups: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        by_count = groups.setdefault(str(r["init"]), {})
        by_count.setdefault(int(r["labelled_volumes"]), []).append(float(r["test_dice"]))  # type: ignore[call-overload, arg-type]
    return groups


def summary_table(rows: Sequence[Row]) -> str:
    """Mean +- std test Dice per initialisation (rows) and number of labelled volumes (columns),
    over labelled sets and seeds, as a markdown table."""
    groups = dice_groups(rows)
    counts = sorted({n for by_count in groups.values() for n in by_count})
    header = "| initialisation | " + " | ".join(f"{n} labelled vol." for n in counts) + " |"
    lines = [header, "|---|" + "---|" * len(counts)]
    for init, by_count in groups.items():
        cells = [
            f"{np.mean(v):.3f} +- {np.std(v):.3f} (n={len(v)})"
            for v in (by_count.get(n, [float("nan")]) for n in counts)
        ]
        lines.append(f"| {init} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runs_table(rows: Sequence[Row]) -> str:
    """One line per run: test Dice, Dice per class, HD95 per class (mm; '-' where undefined)."""
    classes = list(rows[0]["per_class_dice"]) if rows else []  # type: ignore[call-overload]
    lines = [
        "| run | test Dice | "
        + " | ".join(classes)
        + " | "
        + " | ".join(f"HD95 {c} mm" for c in classes)
        + " |",
        "|---|---|" + "---|" * (2 * len(classes)),
    ]
    for r in rows:
        dice, hd95 = r["per_class_dice"], r["per_class_hd95_mm"]
        cells = [f"{dice[c]:.3f}" for c in classes]  # type: ignore[index]
        cells += ["-" if hd95[c] is None else f"{hd95[c]:.1f}" for c in classes]  # type: ignore[index]
        lines.append(f"| {r['run']} | {float(r['test_dice']):.3f} | " + " | ".join(cells) + " |")  # type: ignore[arg-type]
    return "\n".join(lines)


def write_report(
    out: Path,
    rows: Sequence[Row],
    plan: Mapping[str, object],
    wall_seconds: float,
    environment: str,
) -> str:
    """Write ``out/report.md``; return the summary table that was written into it."""
    table = summary_table(rows)
    plan_lines = "\n".join(f"- `{k}`: {v}" for k, v in plan.items())
    text = f"""# contraseg demo on the cardiac phantom

Measured by `contraseg demo` ({environment}); wall time {wall_seconds / 60:.1f} min.
The phantom is a generated stand-in for ACDC: these numbers show what pre-training did under
its conditions, they are not ACDC results. Every initialisation was fine-tuned on the same
labelled volumes; the score is the paper's: per test volume the mean foreground 3-D Dice on the
native grid, then the mean over test volumes, for the best-validation weights.

## Test Dice

{table}

Per run (per-class means over test volumes; HD95 left out where one mask is empty):

{runs_table(rows)}

## Figures

Pre-training losses against their chance level (the loss when all similarities are equal):

![pre-training loss](figures/pretraining_loss.png)

Validation Dice during fine-tuning, one line per initialisation:

![validation Dice](figures/validation_dice.png)

Test Dice against the number of labelled volumes:

![test Dice](figures/test_dice_vs_labelled.png)

Test slices: image, ground truth and each initialisation's prediction
(RV blue, myocardium yellow, LV red):

![overlays](figures/test_overlays.png)

## Settings

{plan_lines}

The raw numbers are in `results.json`; each run directory holds its `config.yaml`,
`metrics.jsonl`, TensorBoard events and `evaluation/*.csv`.
"""
    fileio.write_text(out / "report.md", text)
    return table
