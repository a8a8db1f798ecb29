"""The grid statistics against hand computations on fixed numbers (explicit loops here, scipy
only for the Wilcoxon p of hand-built differences)."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from contraseg.errors import InputError
from contraseg.report import stats
from contraseg.report.stats import (
    NO_DIFFERENCE,
    TOO_FEW,
    Cell,
    PairedStats,
    aggregate,
    class_score,
    compare_to_baseline,
    outcome,
    paired_statistics,
    results_columns,
    results_csv,
    summary_grid,
    write_results_csv,
)

# (init, labelled volumes) -> (combination, seed) -> test Dice. G^D lacks (c3, 1) at 1 volume;
# random's (c2, 1) with all volumes has no score; G^D + L^D was only run with 8 volumes.
DICE = {
    ("random", 1): {
        ("c1", 0): 0.50,
        ("c1", 1): 0.52,
        ("c2", 0): 0.47,
        ("c2", 1): 0.55,
        ("c3", 0): 0.49,
        ("c3", 1): 0.51,
        ("c4", 0): 0.53,
        ("c4", 1): 0.48,
    },
    ("G^D", 1): {
        ("c1", 0): 0.58,
        ("c1", 1): 0.57,
        ("c2", 0): 0.56,
        ("c2", 1): 0.61,
        ("c3", 0): 0.55,
        ("c4", 0): 0.60,
        ("c4", 1): 0.59,
    },
    ("random", "all"): {("c1", 0): 0.80, ("c2", 0): 0.82, ("c2", 1): None},
    ("G^D", "all"): {("c1", 0): 0.81, ("c2", 0): 0.80, ("c2", 1): 0.83},
    ("G^D + L^D", 8): {("c1", 0): 0.7},
}


def make_row(init, count, combination, seed, dice, **extra):
    return {
        "init": init,
        "labelled_volumes": count,
        "combination": combination,
        "seed": seed,
        "test_dice": dice,
        "per_class_dice": {"RV": 0.4, "Myo": 0.5, "LV": dice},
        "per_class_hd95_mm": {"RV": None, "Myo": 4.0, "LV": 2.5},
        "best_val_dice": 0.6,
        "best_iteration": 300,
        "iterations": 400,
        "wall_s": 12.5,
        "run": f"ft-{init}-{count}-{combination}-s{seed}",
        **extra,
    }


def fixed_rows():
    # "all" and G^D come first on purpose: the order of the output must not follow the input's
    order = [("G^D", "all"), ("random", "all"), ("G^D + L^D", 8), ("G^D", 1), ("random", 1)]
    return [make_row(i, n, c, s, v) for i, n in order for (c, s), v in DICE[i, n].items()]


def hand_mean_std(values):
    total = 0.0
    for v in values:
        total += v
    mean = total / len(values)
    squares = 0.0
    for v in values:
        squares += (v - mean) ** 2
    return mean, math.sqrt(squares / (len(values) - 1)) if len(values) > 1 else math.nan


def hand_differences(init, count):
    """init minus random over the (combination, seed) both have a score for, and the count of
    runs left out."""
    ours, base = DICE[init, count], DICE.get(("random", count), {})
    diffs, left_out = [], 0
    for key, value in ours.items():
        if value is not None and base.get(key) is not None:
            diffs.append(value - base[key])
        else:
            left_out += 1
    for key, value in base.items():
        if value is None or ours.get(key) is None:
            left_out += 1
    return diffs, left_out


def loop_bootstrap(diffs, resamples, seed, confidence=0.95):
    """One draw of n indices at a time from the same generator, means by hand, then the
    linearly interpolated percentiles."""
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(resamples):
        total = 0.0
        for i in rng.integers(0, len(diffs), size=len(diffs)):
            total += diffs[i]
        means.append(total / len(diffs))
    means.sort()

    def percentile(q):
        position = q / 100 * (len(means) - 1)
        low = math.floor(position)
        high = min(low + 1, len(means) - 1)
        return means[low] + (position - low) * (means[high] - means[low])

    tail = (1 - confidence) / 2 * 100
    return percentile(tail), percentile(100 - tail)


def test_aggregate_equals_hand_means_and_sample_stds():
    cells = aggregate(fixed_rows())
    assert [(c.init, c.labelled_volumes) for c in cells] == [
        ("random", 1),
        ("random", "all"),
        ("G^D", 1),
        ("G^D", "all"),
        ("G^D + L^D", 8),
    ]
    for cell in cells:
        values = [v for v in DICE[cell.init, cell.labelled_volumes].values() if v is not None]
        mean, std = hand_mean_std(values)
        assert cell.n == len(values)
        assert cell.mean == pytest.approx(mean, rel=1e-12)
        if cell.n > 1:
            assert cell.std == pytest.approx(std, rel=1e-12)
        else:
            assert math.isnan(cell.std)


def test_aggregate_per_class_leaves_missing_values_out():
    rows = fixed_rows()
    rows[0]["per_class_hd95_mm"]["Myo"] = float("nan")
    myo = {
        (c.init, c.labelled_volumes): c
        for c in aggregate(rows, class_score("per_class_hd95_mm", "Myo"))
    }
    assert myo["G^D", "all"].n == 2 and myo["random", "all"].n == 3
    # RV's HD95 is never defined: no cell at all
    assert aggregate(rows, class_score("per_class_hd95_mm", "RV")) == []
    lv = aggregate(rows, class_score("per_class_dice", "LV"))
    assert [c.mean for c in lv] == [c.mean for c in aggregate(rows)]


def test_summary_grid_puts_baseline_first_all_last_and_marks_empty_cells():
    header, body = summary_grid(aggregate(fixed_rows()))
    assert header == [
        "initialisation",
        "1 labelled volume",
        "8 labelled volumes",
        "all labelled volumes",
    ]
    mean, std = hand_mean_std(list(DICE["random", 1].values()))
    assert body[0] == ["random", f"{mean:.3f} ± {std:.3f} (n=8)", "-", "0.810 ± 0.014 (n=2)"]
    assert body[2] == ["G^D + L^D", "-", "0.700 (n=1)", "-"]
    table = stats.summary_markdown(fixed_rows())
    assert table.splitlines()[1] == "|---|---|---|---|"
    assert table.splitlines()[2] == "| " + " | ".join(body[0]) + " |"


def test_markdown_table_escapes_pipes():
    assert stats.markdown_table(["a|b"], [["x"]]).splitlines()[0] == "| a\\|b |"


@pytest.mark.parametrize(("init", "count"), [("G^D", 1), ("G^D", "all")])
def test_paired_statistics_equal_hand_computation(init, count):
    comparison = next(
        c
        for c in compare_to_baseline(fixed_rows())
        if (c.init, c.labelled_volumes) == (init, count)
    )
    diffs, left_out = hand_differences(init, count)
    assert comparison.n_pairs == len(diffs) and comparison.unmatched == left_out
    assert comparison.mean_difference == pytest.approx(sum(diffs) / len(diffs), rel=1e-12)
    low, high = loop_bootstrap(diffs, resamples=10_000, seed=0)
    assert comparison.ci_low == pytest.approx(low, rel=1e-9)
    assert comparison.ci_high == pytest.approx(high, rel=1e-9)
    assert comparison.p_value == scipy_stats.wilcoxon(diffs).pvalue


def test_bootstrap_follows_its_seed_and_resamples():
    # distinct values, so that the interpolation between neighbouring bootstrap means matters
    diffs = [0.031, -0.012, 0.054, 0.0205, 0.0437, 0.0003, 0.0611]
    for seed in (0, 7):
        result = paired_statistics(diffs, resamples=500, seed=seed, confidence=0.9)
        assert (result.ci_low, result.ci_high) == pytest.approx(
            loop_bootstrap(diffs, 500, seed, confidence=0.9), rel=1e-9
        )
    assert paired_statistics(diffs) == paired_statistics(diffs)


def test_verdicts_in_words():
    comparisons = {(c.init, c.labelled_volumes): c for c in compare_to_baseline(fixed_rows())}
    at_one = comparisons["G^D", 1]
    assert at_one.outcome == "better"
    assert at_one.verdict == (
        f"G^D beats random with 1 labelled volume: {at_one.mean_difference:+.3f} "
        f"(95% CI {at_one.ci_low:+.3f}..{at_one.ci_high:+.3f}, p = {at_one.p_value:.3g}, "
        "7 pairs, 1 unmatched run left out)"
    )
    # two pairs, +0.01 and -0.02: the bootstrap means are -0.02, -0.005 and +0.01
    assert comparisons["G^D", "all"].verdict == (
        "G^D vs random with all labelled volumes: no difference shown (-0.005, "
        "95% CI -0.020..+0.010, p = 1, 2 pairs, 2 unmatched runs left out)"
    )
    alone = comparisons["G^D + L^D", 8]
    assert (alone.n_pairs, alone.unmatched, alone.outcome) == (0, 1, TOO_FEW)
    assert alone.verdict == (
        "G^D + L^D vs random with 8 labelled volumes: too few pairs to compare "
        "(0 pairs, 1 unmatched run left out)"
    )


def paired_rows(diffs, count=2):
    rows = []
    for seed, d in enumerate(diffs):
        rows.append(make_row("random", count, "c1", seed, 0.5))
        rows.append(make_row("G^D", count, "c1", seed, 0.5 + d))
    return rows


def test_six_equal_wins_beat_and_six_equal_losses_lose():
    (win,) = compare_to_baseline(paired_rows([0.125] * 6))
    assert win.outcome == "better" and win.p_value == 2 / 2**6
    assert win.verdict == (
        "G^D beats random with 2 labelled volumes: +0.125 (95% CI +0.125..+0.125, "
        "p = 0.0312, 6 pairs)"
    )
    (loss,) = compare_to_baseline(paired_rows([-0.125] * 6))
    assert loss.outcome == "worse"
    assert loss.verdict.startswith("G^D is worse than random with 2 labelled volumes: -0.125")


def test_five_pairs_cannot_show_a_difference():
    # the smallest two-sided signed-rank p of 5 pairs is 2 / 2**5 = 0.0625
    (five,) = compare_to_baseline(paired_rows([0.125] * 5))
    assert five.p_value == pytest.approx(0.0625) and five.ci_low > 0
    assert five.outcome == NO_DIFFERENCE
    assert five.verdict == (
        "G^D vs random with 2 labelled volumes: no difference shown (+0.125, "
        "95% CI +0.125..+0.125, p = 0.0625, 5 pairs)"
    )


@pytest.mark.filterwarnings("error")
def test_identical_values_show_no_difference_without_warnings():
    (same,) = compare_to_baseline(paired_rows([0.0] * 4))
    assert (same.n_pairs, same.mean_difference, same.ci_low, same.ci_high, same.p_value) == (
        4,
        0.0,
        0.0,
        0.0,
        1.0,
    )
    assert same.outcome == NO_DIFFERENCE


def test_one_pair_and_no_pair():
    one = paired_statistics([0.25])
    assert (one.n_pairs, one.mean_difference) == (1, 0.25)
    assert math.isnan(one.ci_low) and math.isnan(one.ci_high) and math.isnan(one.p_value)
    assert outcome(one) == TOO_FEW
    (only,) = compare_to_baseline(paired_rows([0.25]))
    assert only.verdict == (
        "G^D vs random with 2 labelled volumes: too few pairs to compare (1 pair, +0.250)"
    )
    none = paired_statistics([])
    assert none.n_pairs == 0 and math.isnan(none.mean_difference) and outcome(none) == TOO_FEW


def test_ties_and_zeros_use_scipys_wilcoxon_on_the_same_differences():
    diffs = [0.0, 0.02, 0.02, -0.01, 0.03, 0.03, 0.0, 0.05]
    result = paired_statistics(diffs)
    assert result.p_value == scipy_stats.wilcoxon(diffs, zero_method="wilcox").pvalue


@pytest.mark.parametrize(
    ("low", "high", "p", "expected"),
    [
        (0.01, 0.05, 0.01, "better"),
        (-0.05, -0.01, 0.01, "worse"),
        (0.01, 0.05, 0.2, NO_DIFFERENCE),  # the interval alone does not decide
        (-0.01, 0.05, 0.01, NO_DIFFERENCE),  # nor the p-value alone
        (0.0, 0.05, 0.01, NO_DIFFERENCE),  # touching 0 is not excluding it
    ],
)
def test_outcome_needs_interval_and_p_to_agree(low, high, p, expected):
    assert outcome(PairedStats(10, (low + high) / 2, low, high, p)) == expected


def test_cell_text():
    assert Cell("G^D", 1, 0.7124, 0.0311, 5).text() == "0.712 ± 0.031 (n=5)"
    assert Cell("G^D", 1, 0.7124, math.nan, 1).text(2) == "0.71 (n=1)"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labelled_volumes": 0}, "labelled_volumes must be a positive int or 'all'"),
        ({"labelled_volumes": "some"}, "labelled_volumes must be a positive int or 'all'"),
        ({"labelled_volumes": True}, "labelled_volumes must be a positive int or 'all'"),
        ({"test_dice": "high"}, "test_dice is not a number: 'high'"),
    ],
)
def test_bad_rows_name_their_run(change, message):
    rows = fixed_rows()
    rows[3] = {**rows[3], **change}
    with pytest.raises(InputError, match=f"ft-random-all-c1-s0: {message}"):
        aggregate(rows)


def test_a_missing_key_or_a_repeated_cell_is_refused():
    rows = fixed_rows()
    del rows[1]["seed"]
    with pytest.raises(InputError, match=r"ft-G\^D-all-c2-s0: a result row has no 'seed'"):
        compare_to_baseline(rows)
    rows = fixed_rows()
    with pytest.raises(InputError, match="two runs of init='G\\^D', labelled_volumes='all'"):
        aggregate([*rows, {**rows[0], "run": "again"}])


def test_results_csv_columns_and_values():
    rows = fixed_rows()[:2]
    rows[0] = {**rows[0], "pretrain.strategy": "GD", "augment": {"flip": True}}
    rows[1] = {**rows[1], "per_class_dice": {"RV": 0.4, "LV": 0.1, "Extra": 1 / 3}}
    columns = results_columns(rows)
    assert columns == [
        "run",
        "init",
        "labelled_volumes",
        "combination",
        "seed",
        "augment",
        "pretrain.strategy",
        "test_dice",
        "dice_RV",
        "dice_Myo",
        "dice_LV",
        "dice_Extra",
        "hd95_mm_RV",
        "hd95_mm_Myo",
        "hd95_mm_LV",
        "best_val_dice",
        "best_iteration",
        "iterations",
        "wall_s",
    ]
    parsed = list(csv.DictReader(io.StringIO(results_csv(rows))))
    assert [list(p) for p in parsed] == [columns, columns]
    first, second = parsed
    assert first["run"] == "ft-G^D-all-c1-s0" and first["labelled_volumes"] == "all"
    assert first["augment"] == '{"flip": true}' and second["augment"] == ""
    assert first["pretrain.strategy"] == "GD" and second["pretrain.strategy"] == ""
    assert first["hd95_mm_RV"] == "" and first["hd95_mm_Myo"] == "4.0"
    assert float(second["dice_Extra"]) == 1 / 3 and first["dice_Extra"] == ""
    assert second["dice_Myo"] == ""
    assert float(first["test_dice"]) == rows[0]["test_dice"]
    assert (first["best_iteration"], first["iterations"], first["wall_s"]) == ("300", "400", "12.5")


def test_write_results_csv(tmp_path):
    rows = [make_row("G^{D-} ±", 1, "c1", 0, 0.5)]
    write_results_csv(tmp_path / "results.csv", rows)
    assert (tmp_path / "results.csv").read_bytes() == results_csv(rows).encode("utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_numpy_integers_count_as_labelled_volumes():
    rows = [{**r, "labelled_volumes": np.int64(r["labelled_volumes"])} for r in paired_rows([0.1])]
    assert [c.labelled_volumes for c in aggregate(rows)] == [2, 2]
    assert type(aggregate(rows)[0].labelled_volumes) is int
