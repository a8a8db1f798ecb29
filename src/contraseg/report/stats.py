"""Statistics of a grid of fine-tuning runs, as plain functions of plain rows.

A row is one fine-tuning run (``init``, ``labelled_volumes`` an int or ``"all"``,
``combination``, ``seed``, ``test_dice``, per-class Dice and HD95, ...). The paper's tables
average each (initialisation, number of labelled volumes) cell over labelled sets and seeds;
here each cell also carries its sample standard deviation and n, and every initialisation is
compared with the random one on the runs that share a labelled set and a seed. The rules, the
verdict included, are written out in docs/statistics.md.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats

from contraseg import fileio
from contraseg.errors import InputError

Row = Mapping[str, object]
Value = Callable[[Row], float | None]

ALL = "all"
BASELINE = "random"
LEVEL = 0.05
CONFIDENCE = 0.95
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
RESULTS_CSV = "results.csv"


def _run(row: Row) -> str:
    """What an error names: the run's folder, or the rows when the run has none."""
    return str(row.get("run", "rows"))


def _field(row: Row, key: str) -> object:
    if key not in row:
        raise InputError(_run(row), f"a result row has no {key!r}")
    return row[key]


def labelled_volumes(row: Row) -> int | str:
    """The row's number of labelled volumes: a positive int or ``"all"``."""
    value = _field(row, "labelled_volumes")
    if value == ALL:
        return ALL
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0:
        return int(value)
    raise InputError(_run(row), f"labelled_volumes must be a positive int or 'all': {value!r}")


def labelled_order(value: int | str) -> tuple[int, int]:
    """Sort key for numbers of labelled volumes: ascending counts, ``"all"`` last."""
    return (1, 0) if value == ALL else (0, int(value))


def labelled_phrase(value: int | str) -> str:
    """``1 labelled volume``, ``8 labelled volumes``, ``all labelled volumes``."""
    return f"{value} labelled volume{'' if value == 1 else 's'}"


def _number(row: Row, name: str, value: object) -> float | None:
    """A score as a float, None when missing (None or NaN, e.g. an undefined HD95)."""
    if value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(_run(row), f"{name} is not a number: {value!r}") from None
    return None if math.isnan(number) else number


def mean_test_dice(row: Row) -> float | None:
    """The paper's score: mean foreground Dice over test volumes."""
    return _number(row, "test_dice", _field(row, "test_dice"))


def class_score(key: str, name: str) -> Value:
    """A reader of one class's score, e.g. ``class_score("per_class_dice", "LV")``; a class the
    row lacks reads as missing."""

    def read(row: Row) -> float | None:
        return _number(row, f"{key}[{name!r}]", _field(row, key).get(name))  # type: ignore[attr-defined]

    return read


def _index(rows: Sequence[Row], value: Value) -> dict[tuple[str, int | str], dict[Hashable, Row]]:
    """(init, labelled_volumes) -> (combination, seed) -> row, refusing two runs of one cell: a
    grid that repeats a cell would be averaged and paired ambiguously."""
    index: dict[tuple[str, int | str], dict[Hashable, Row]] = {}
    for row in rows:
        cell = index.setdefault((str(_field(row, "init")), labelled_volumes(row)), {})
        key = (_field(row, "combination"), _field(row, "seed"))
        if key in cell:
            raise InputError(
                _run(row),
                f"two runs of init={row['init']!r}, labelled_volumes={row['labelled_volumes']!r}, "
                f"combination={key[0]!r}, seed={key[1]!r} (the other is {cell[key].get('run')!r})",
            )
        value(row)  # a malformed score fails here, naming its run
        cell[key] = row
    return index


def init_order(rows: Sequence[Row], baseline: str = BASELINE) -> list[str]:
    """Initialisations in the order they first appear, the baseline first as in the paper."""
    inits = list(dict.fromkeys(str(_field(r, "init")) for r in rows))
    return sorted(inits, key=lambda init: init != baseline)


@dataclass(frozen=True)
class Cell:
    """One cell of the paper-style table: mean and sample std (ddof=1; NaN when n < 2)."""

    init: str
    labelled_volumes: int | str
    mean: float
    std: float
    n: int

    def text(self, digits: int = 3) -> str:
        """``0.712 ± 0.031 (n=5)``; a single run has no spread: ``0.712 (n=1)``."""
        spread = "" if self.n < 2 else f" ± {self.std:.{digits}f}"
        return f"{self.mean:.{digits}f}{spread} (n={self.n})"


def describe(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample std (ddof=1, NaN below two values) and n."""
    array = np.asarray(values, dtype=float)
    std = float(np.std(array, ddof=1)) if len(array) > 1 else math.nan
    return float(np.mean(array)), std, len(array)


def aggregate(
    rows: Sequence[Row], value: Value = mean_test_dice, baseline: str = BASELINE
) -> list[Cell]:
    """Mean ± std of ``value`` per (init, labelled_volumes) over combinations and seeds.

    Cells come init by init (:func:`init_order`), counts ascending with ``"all"`` last. Runs
    whose value is missing (None or NaN, e.g. an undefined HD95) are left out of n; a cell with
    no value at all is left out.
    """
    index = _index(rows, value)
    cells = []
    for init in init_order(rows, baseline):
        counts = sorted((n for i, n in index if i == init), key=labelled_order)
        for count in counts:
            values = [v for r in index[init, count].values() if (v := value(r)) is not None]
            if values:
                cells.append(Cell(init, count, *describe(values)))
    return cells


def summary_grid(cells: Sequence[Cell], digits: int = 3) -> tuple[list[str], list[list[str]]]:
    """The paper's layout: a header and one row per init, one column per number of labelled
    volumes (``"all"`` last); an empty cell reads ``-``."""
    counts = sorted({c.labelled_volumes for c in cells}, key=labelled_order)
    inits = list(dict.fromkeys(c.init for c in cells))
    text = {(c.init, c.labelled_volumes): c.text(digits) for c in cells}
    header = ["initialisation", *(labelled_phrase(n) for n in counts)]
    body = [[init, *(text.get((init, n), "-") for n in counts)] for init in inits]
    return header, body


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; ``|`` inside a cell is escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in body)])


def summary_markdown(rows: Sequence[Row], value: Value = mean_test_dice, digits: int = 3) -> str:
    """:func:`aggregate` laid out by :func:`summary_grid` as a markdown table."""
    return markdown_table(*summary_grid(aggregate(rows, value), digits))


@dataclass(frozen=True)
class PairedStats:
    """Paired differences (init minus baseline): their mean, a percentile-bootstrap interval
    and the Wilcoxon signed-rank p-value. Interval and p are NaN below two pairs."""

    n_pairs: int
    mean_difference: float
    ci_low: float
    ci_high: float
    p_value: float


def bootstrap_interval(
    differences: np.ndarray,
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap of the mean over pairs: ``resamples`` draws of n pairs with
    replacement from ``numpy.random.default_rng(seed)``, one row of indices per draw."""
    n = len(differences)
    indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = differences[indices].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_statistics(
    differences: Sequence[float],
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> PairedStats:
    """Mean difference, bootstrap interval and two-sided Wilcoxon signed-rank p.

    Below two pairs there is nothing to resample or rank: interval and p are NaN. When every
    difference is zero the p-value is 1 (scipy would divide by zero). Zero differences are
    dropped from the ranks (``zero_method="wilcox"``) and ties share ranks; scipy's
    ``method="auto"`` picks the exact, permutation or normal null distribution.
    """
    d = np.asarray(differences, dtype=float)
    if len(d) == 0:
        return PairedStats(0, math.nan, math.nan, math.nan, math.nan)
    if len(d) < 2:
        return PairedStats(1, float(d[0]), math.nan, math.nan, math.nan)
    low, high = bootstrap_interval(d, resamples, seed, confidence)
    if not np.any(d != 0):
        p = 1.0
    else:
        p = float(scipy_stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
    return PairedStats(len(d), float(np.mean(d)), low, high, p)


BETTER, WORSE, NO_DIFFERENCE, TOO_FEW = "better", "worse", "no difference shown", "too few pairs"


def outcome(stats: PairedStats, level: float = LEVEL) -> str:
    """The verdict rule: a win (or a loss) needs at least two pairs, a bootstrap interval that
    excludes 0 on that side *and* a Wilcoxon p below ``level``; anything else shows no
    difference. Both must agree so that neither a lucky resampling nor a rank test on a
    negligible shift decides alone."""
    if stats.n_pairs < 2:
        return TOO_FEW
    if stats.p_value < level and stats.ci_low > 0:
        return BETTER
    if stats.p_value < level and stats.ci_high < 0:
        return WORSE
    return NO_DIFFERENCE


def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3g}"


@dataclass(frozen=True)
class Comparison(PairedStats):
    """One initialisation against the baseline at one number of labelled volumes."""

    init: str
    baseline: str
    labelled_volumes: int | str
    unmatched: int
    outcome: str
    confidence: float = CONFIDENCE

    @property
    def verdict(self) -> str:
        """One line in words, e.g. ``G^D beats random with 1 labelled volume: +0.070 (95% CI
        +0.040..+0.100, p = 0.008, 10 pairs)``."""
        where = f"with {labelled_phrase(self.labelled_volumes)}"
        pairs = f"{self.n_pairs} pair{'' if self.n_pairs == 1 else 's'}"
        left_out = [f"{self.unmatched} unmatched run{'s' * (self.unmatched != 1)} left out"]
        left_out = left_out if self.unmatched else []
        if self.outcome == TOO_FEW:
            shown = [f"{self.mean_difference:+.3f}"] if self.n_pairs else []
            details = ", ".join([pairs, *shown, *left_out])
            return f"{self.init} vs {self.baseline} {where}: too few pairs to compare ({details})"
        interval = (
            f"{self.confidence:.0%} CI {self.ci_low:+.3f}..{self.ci_high:+.3f}, "
            f"{_p_text(self.p_value)}, {pairs}"
        )
        details = ", ".join([interval, *left_out])
        if self.outcome == NO_DIFFERENCE:
            return (
                f"{self.init} vs {self.baseline} {where}: no difference shown "
                f"({self.mean_difference:+.3f}, {details})"
            )
        verb = "beats" if self.outcome == BETTER else "is worse than"
        return (
            f"{self.init} {verb} {self.baseline} {where}: {self.mean_difference:+.3f} ({details})"
        )


def compare_to_baseline(
    rows: Sequence[Row],
    baseline: str = BASELINE,
    value: Value = mean_test_dice,
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = LEVEL,
    confidence: float = CONFIDENCE,
) -> list[Comparison]:
    """Every other init against ``baseline`` at each number of labelled volumes it was run with.

    Pairs are runs of the two inits with the same combination and seed; a run without a
    partner, or with a missing value, is left out and counted in ``unmatched``.
    """
    index = _index(rows, value)
    comparisons = []
    for init in init_order(rows, baseline):
        if init == baseline:
            continue
        for count in sorted((n for i, n in index if i == init), key=labelled_order):
            ours = {k: v for k, r in index[init, count].items() if (v := value(r)) is not None}
            theirs = index.get((baseline, count), {})
            base = {k: v for k, r in theirs.items() if (v := value(r)) is not None}
            shared = [k for k in ours if k in base]
            unmatched = len(index[init, count]) + len(theirs) - 2 * len(shared)
            stats = paired_statistics(
                [ours[k] - base[k] for k in shared], resamples, seed, confidence
            )
            comparisons.append(
                Comparison(
                    **vars(stats),
                    init=init,
                    baseline=baseline,
                    labelled_volumes=count,
                    unmatched=unmatched,
                    outcome=outcome(stats, level),
                    confidence=confidence,
                )
            )
    return comparisons


_SCHEMA = {
    "run",
    "init",
    "labelled_volumes",
    "combination",
    "seed",
    "test_dice",
    "per_class_dice",
    "per_class_hd95_mm",
    "best_val_dice",
    "best_iteration",
    "iterations",
    "wall_s",
}
_LEADING = ["run", "init", "labelled_volumes", "combination", "seed"]
_TRAILING = ["best_val_dice", "best_iteration", "iterations", "wall_s"]


def _classes(rows: Sequence[Row], key: str) -> list[str]:
    return list(dict.fromkeys(c for r in rows for c in r.get(key) or {}))  # type: ignore[attr-defined]


def results_columns(rows: Sequence[Row]) -> list[str]:
    """The run's identity, the other grid keys (sorted), test Dice, Dice then HD95 per class
    (classes in the order they first appear), then best validation Dice, its iteration,
    iterations and wall time."""
    grid = sorted({k for r in rows for k in r} - _SCHEMA)
    dice = [f"dice_{c}" for c in _classes(rows, "per_class_dice")]
    hd95 = [f"hd95_mm_{c}" for c in _classes(rows, "per_class_hd95_mm")]
    return [*_LEADING, *grid, "test_dice", *dice, *hd95, *_TRAILING]


def _csv_value(value: object) -> str:
    """Empty for a missing value, the shortest exact text for a float, JSON for a structure."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, sort_keys=True)
    return repr(value) if isinstance(value, float) else str(value)


def results_csv(rows: Sequence[Row]) -> str:
    """One CSV line per run, in the rows' order, with :func:`results_columns`."""
    columns = results_columns(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        flat = dict(row)
        for prefix, key in (("dice_", "per_class_dice"), ("hd95_mm_", "per_class_hd95_mm")):
            flat.update({prefix + c: v for c, v in (row.get(key) or {}).items()})  # type: ignore[attr-defined]
        writer.writerow([_csv_value(flat.get(c)) for c in columns])
    return out.getvalue()


def write_results_csv(path: str | Path, rows: Sequence[Row]) -> None:
    """Write :func:`results_csv` atomically, in UTF-8."""
    fileio.write_bytes(path, results_csv(rows).encode("utf-8"))
