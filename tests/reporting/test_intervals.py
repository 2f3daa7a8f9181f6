"""The paired bootstrap intervals of the report's differences (reporting/intervals.py): cases whose
bootstrap distribution is known by hand, pairing by seed, and a table that carries them."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from warmup_distill_kedro.reporting.intervals import paired_interval, run_items
from warmup_distill_kedro.reporting.markdown import compact_markdown, render_markdown
from warmup_distill_kedro.reporting.plots import accuracy_by_objective
from warmup_distill_kedro.reporting.records import evaluation_records
from warmup_distill_kedro.reporting.table import build_table


def _run(scores: list[float], benchmark: str = "math") -> dict[str, pd.Series]:
    return {benchmark: pd.Series(scores, index=[f"q{i}" for i in range(len(scores))], dtype=float)}


def test_identical_item_differences_give_a_zero_width_interval_at_their_value():
    # Every item differs by exactly 1 - 0.25: any resample of items has mean 0.75.
    interval = paired_interval({"-": _run([1, 1, 1, 1])}, {"-": _run([0.25] * 4)}, ["math"])
    assert (interval.mean, interval.low, interval.high) == pytest.approx((0.75, 0.75, 0.75))
    assert interval.resolved


def test_two_items_by_hand():
    # Differences (1, 0): a resample of 2 items has mean 0 (p 1/4), 1/2 (p 1/2) or 1 (p 1/4), so the
    # 2.5th and 97.5th percentiles are 0 and 1: the interval touches 0 and the difference is not resolved.
    interval = paired_interval({"-": _run([1, 0])}, {"-": _run([0, 0])}, ["math"], resamples=20000)
    assert (interval.mean, interval.low, interval.high) == pytest.approx((0.5, 0.0, 1.0))
    assert not interval.resolved


def test_three_items_match_the_enumerated_bootstrap_distribution():
    differences = np.array([1.0, 0.0, -1.0])
    means = [differences[list(draw)].mean() for draw in itertools.product(range(3), repeat=3)]
    # enumerated: every resample equally likely; the percentiles of that discrete distribution
    low, high = np.quantile(means, [0.025, 0.975], method="inverted_cdf")
    interval = paired_interval({"-": _run([1, 0, 0])}, {"-": _run([0, 0, 1])}, ["math"], resamples=40000)
    assert (interval.low, interval.high) == pytest.approx((low, high))
    assert interval.mean == pytest.approx(0.0)


def test_seeds_pair_by_seed_and_their_spread_widens_the_interval():
    # Item differences are constant within a seed (+0.1 for seed 0, +0.3 for seed 1): items add no
    # spread, the two seeds do. Resampling 2 seeds: means 0.1, 0.2, 0.3 with p 1/4, 1/2, 1/4.
    minuend = {"0": _run([0.6, 0.6, 0.6]), "1": _run([0.8, 0.8, 0.8])}
    subtrahend = {"0": _run([0.5] * 3), "1": _run([0.5] * 3)}
    interval = paired_interval(minuend, subtrahend, ["math"], resamples=20000)
    assert (interval.mean, interval.low, interval.high) == pytest.approx((0.2, 0.1, 0.3))
    # A side evaluated once (a student before KD) is paired with every seed of the other.
    once = paired_interval(minuend, {"-": _run([0.5] * 3)}, ["math"], resamples=20000)
    assert (once.low, once.high) == pytest.approx((0.1, 0.3))


def test_the_average_resamples_each_benchmark_and_halves_the_sum():
    a = {"-": {**_run([1, 1]), **_run([0.5, 0.5], "instruction")}}
    b = {"-": {**_run([0, 0]), **_run([0.1, 0.1], "instruction")}}
    interval = paired_interval(a, b, ["math", "instruction"])
    assert (interval.mean, interval.low, interval.high) == pytest.approx((0.7, 0.7, 0.7))


def test_models_scored_on_different_items_are_refused():
    other = {"math": pd.Series([1.0, 0.0], index=["q0", "q9"])}
    with pytest.raises(ValueError, match="different test items"):
        paired_interval({"-": _run([1, 0])}, {"-": other}, ["math"])


def test_a_missing_benchmark_or_unpaired_seeds_give_no_interval():
    assert paired_interval({"-": _run([1, 0])}, {"-": _run([1, 0], "instruction")}, ["math"]) is None
    assert (
        paired_interval({"0": _run([1]), "1": _run([1])}, {"2": _run([0]), "3": _run([0])}, ["math"]) is None
    )


def _evaluation(subject, variant, objective, correct, rouge, seed=None):
    ids = [f"m{i}" for i in range(len(correct))]
    evaluation = {
        "subject": subject,
        "variant": variant,
        "objective": objective,
        "math": {"exact_match": float(np.mean(correct)), "n_examples": len(correct)},
        "instruction": {"rouge_l_per_seed": {"0": float(np.mean(rouge)), "1": float(np.mean(rouge))}},
        "distribution": None,
        "items": {
            "math": {"example_ids": ids, "scores": [float(c) for c in correct]},
            "instruction": {"example_ids": [f"i{i}" for i in range(len(rouge))], "scores": list(rouge)},
        },
    }
    if seed is not None:
        evaluation["training_seed"] = seed
    return evaluation


def test_the_report_table_carries_intervals_and_marks_what_they_resolve():
    rng = np.random.default_rng(0)
    vanilla_correct = rng.random(200) < 0.3
    evaluations = {"teacher": _evaluation("teacher", "teacher", "teacher", [1] * 200, [0.5] * 20)}
    for variant in ("vanilla", "warmup"):
        evaluations[f"{variant}.before_kd"] = _evaluation(
            f"{variant}.before_kd", variant, "before_kd", vanilla_correct, [0.2] * 20
        )
        for seed in (0, 1):
            # fkl: 30 more problems right than sft on every seed (resolved); warmup = vanilla (unresolved)
            fkl = vanilla_correct.copy()
            fkl[np.flatnonzero(~vanilla_correct)[seed : seed + 30]] = True
            evaluations[f"{variant}.fkl.seed{seed}"] = _evaluation(
                f"{variant}.fkl.seed{seed}", variant, "fkl", fkl, [0.3] * 20, seed
            )
            evaluations[f"{variant}.sft.seed{seed}"] = _evaluation(
                f"{variant}.sft.seed{seed}", variant, "sft", vanilla_correct, [0.2] * 20, seed
            )
    table = build_table(
        evaluation_records(evaluations), ["vanilla", "warmup"], ["fkl", "sft"], run_items(evaluations)
    )
    rows = table.set_index(["objective", "variant", "benchmark"])
    versus_sft = rows.loc[("fkl-sft", "vanilla", "math")]
    assert versus_sft["mean"] == pytest.approx(30 / 200) and versus_sft["n_seeds"] == 2
    assert 0 < versus_sft["ci_low"] <= versus_sft["mean"] <= versus_sft["ci_high"]
    warmup = rows.loc[("fkl", "warmup-vanilla", "math")]
    assert warmup["mean"] == pytest.approx(0.0) and warmup["ci_low"] <= 0 <= warmup["ci_high"]
    assert rows.loc[("fkl", "vanilla", "math")]["n_seeds"] == 2  # the training seeds are the spread
    assert math.isnan(rows.loc[("fkl", "vanilla", "math")]["ci_low"])  # not a difference
    average = rows.loc[("fkl-sft", "vanilla", "average")]
    assert average["mean"] == pytest.approx((30 / 200 + 0.1) / 2) and average["ci_low"] > 0

    markdown, compact = render_markdown(table), compact_markdown(table)
    for text in (markdown, compact):
        assert f"+15.0 [{100 * versus_sft['ci_low']:+.1f}, {100 * versus_sft['ci_high']:+.1f}] *" in text
        assert "paired bootstrap" in text
    # warmup = vanilla item by item: a zero difference, not marked
    warmup_cell = compact.split("| fkl ")[1].splitlines()[0]
    assert warmup_cell.rstrip(" |").endswith("+0.0 [+0.0, +0.0]")

    # The accuracy plot draws the accuracies, not the difference rows.
    figure = accuracy_by_objective(table)
    labels = [label.get_text() for label in figure.axes[0].get_xticklabels()]
    assert "fkl" in " ".join(labels) and not any("-sft" in label for label in labels)
