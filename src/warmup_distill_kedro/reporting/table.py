"""Records -> the comparison table (long format); markdown.py renders it.

The table has one row per (objective, variant, benchmark, metric) with mean, std and number of seeds.
The differences (``warmup-vanilla`` and ``warmup-control`` columns, ``<objective>-sft`` rows) also carry
the 95% interval of their paired bootstrap over the test items (reporting.intervals) where the
evaluations hold item scores: ``ci_low``, ``ci_high``.
Every expected grid cell has rows: a cell that produced no records gets rows with status ``missing``
rather than disappearing, because a table that silently drops the cells that failed overstates the
method it favours.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from warmup_distill_kedro.grid import BEFORE_KD, TEACHER
from warmup_distill_kedro.reporting.intervals import Items, paired_interval
from warmup_distill_kedro.reporting.records import (
    DISTRIBUTION,
    INSTRUCTION,
    MATH,
    RECORD_COLUMNS,
)

TABLE_COLUMNS = (
    "objective", "benchmark", "variant", "metric", "mean", "std", "n_seeds", "status", "ci_low", "ci_high"
)  # fmt: skip

REFERENCE_OBJECTIVES = (TEACHER, BEFORE_KD)

AVERAGE = "average"
SCORE = "score"
# The benchmarks whose accuracy enters the average, with the metric that is their accuracy.
ACCURACY_METRICS = {MATH: "exact_match", INSTRUCTION: "rouge_l"}
TABLE1_BENCHMARKS = {**ACCURACY_METRICS, AVERAGE: SCORE}
DISTRIBUTION_SHOWN = ("heldout_kl", "rejected_share", "heldout_entropy", "heldout_nll")
PERCENT_METRICS = {"exact_match", "flexible_match", "rouge_l", SCORE, "rejected_share"}

OK = "ok"
MISSING = "missing"
# A present cell whose average lacks one of the benchmarks other cells have: averaging what is there
# would compare a math-only number with math+instruction averages.
INCOMPLETE = "incomplete"

# (minuend, subtrahend) variant pairs reported as differences; the name of the delta variant.
DELTA_PAIRS = (("warmup", "vanilla"), ("warmup", "control"))
BENCHMARK_ORDER = (MATH, INSTRUCTION, AVERAGE, DISTRIBUTION)
METRIC_ORDER = (
    "exact_match",
    "flexible_match",  # math: the response's last number (core/tasks/answers.py); not in the average
    "rouge_l",
    SCORE,
    "heldout_nll",
    "heldout_kl",
    "heldout_entropy",
    "rejected_share",
)
OBJECTIVE_LABELS = {TEACHER: "teacher", BEFORE_KD: "before KD"}
BENCHMARK_LABELS = {MATH: "math EM", INSTRUCTION: "ROUGE-L", AVERAGE: "average"}

KEY = ["objective", "variant", "benchmark", "metric"]


def delta_name(minuend: str, subtrahend: str) -> str:
    return f"{minuend}-{subtrahend}"


DELTA_VARIANTS = tuple(delta_name(a, b) for a, b in DELTA_PAIRS)
# Every KD objective is also reported against the plain-SFT baseline of the same variant, when the grid has it.
BASELINE = "sft"
# The benchmarks whose items an interval resamples, per (benchmark, metric) of the table: the item scores
# are those of the accuracy metrics (math exact match, Rouge-L), and the average is theirs.
INTERVAL_BENCHMARKS = {
    (MATH, "exact_match"): (MATH,),
    (INSTRUCTION, "rouge_l"): (INSTRUCTION,),
    (AVERAGE, SCORE): (MATH, INSTRUCTION),
}


def baseline_name(objective: str) -> str:
    return f"{objective}-{BASELINE}"


def is_difference(objective: str, variant: str) -> bool:
    """Whether a table row is a difference (a ``warmup-vanilla`` column or an ``<objective>-sft`` row)."""
    return variant in DELTA_VARIANTS or objective.endswith(f"-{BASELINE}")


# -------------------------------------------------------------------------------------------- building
def build_table(
    records: pd.DataFrame,
    variants: Sequence[str],
    objectives: Sequence[str],
    items: Mapping[tuple[str, str], Mapping[str, Items]] | None = None,
) -> pd.DataFrame:
    """The long comparison table (columns ``TABLE_COLUMNS``) of ``records`` for the grid variants x objectives.

    Rows: every (objective, variant) in the records, every expected cell (the teacher, ``before_kd`` and
    every KD objective for each variant; ``missing`` when it has no records), the ``average``/``score``
    of math and instruction, the ``warmup-vanilla`` (and ``warmup-control``) differences and, with ``sft``
    in the grid, each objective's difference to it (``<objective>-sft``). ``items`` (intervals.run_items):
    the item scores that give each accuracy difference its interval. ``table.attrs["seeds"]`` keeps the
    seeds seen per benchmark for the Markdown footer.
    """
    _check_records(records)
    variants = _names("variants", variants)
    objectives = [name for name in _names("objectives", objectives) if name not in REFERENCE_OBJECTIVES]
    stats = _seed_statistics(records)
    stats = pd.concat([stats, _averages(records)], ignore_index=True)
    stats = _with_missing_cells(stats, _expected_cells(variants, objectives))
    found_variants = [v for v in stats["variant"].unique() if v != TEACHER]
    all_variants = list(dict.fromkeys([*variants, *found_variants]))
    stats = pd.concat(
        [
            stats,
            _deltas(stats, all_variants, expected=variants),
            _baseline_deltas(stats, variants, objectives),
        ],
        ignore_index=True,
    )
    if items:
        stats = _with_intervals(stats, items)
    table = _ordered(stats, variants, objectives)
    table.attrs["seeds"] = {
        benchmark: sorted({str(seed) for seed in group["seed"]}, key=_seed_sort_key)
        for benchmark, group in records.groupby("benchmark", sort=False)
    }
    return table


def _check_records(records: pd.DataFrame) -> None:
    if not isinstance(records, pd.DataFrame):
        raise ValueError(f"records must be a pandas DataFrame, got {type(records).__name__}")
    absent = [column for column in RECORD_COLUMNS if column not in records.columns]
    if absent:
        raise ValueError(f"records: missing column(s) {absent}; expected {list(RECORD_COLUMNS)}")
    if records.empty:
        raise ValueError("records: no evaluation records; nothing to tabulate")
    values = pd.to_numeric(records["value"], errors="coerce")
    bad = records[values.isna()]
    if not bad.empty:
        row = bad.iloc[0]
        raise ValueError(
            f"records: field 'value' of {row['subject']} {row['benchmark']}.{row['metric']} "
            f"(seed {row['seed']}) is not a number: {row['value']!r}"
        )
    duplicated = records[
        records.duplicated(["objective", "variant", "benchmark", "metric", "seed"], keep=False)
    ]
    if not duplicated.empty:
        row = duplicated.iloc[0]
        subjects = sorted(duplicated["subject"].astype(str).unique())
        raise ValueError(
            f"records: {row['variant']}/{row['objective']} {row['benchmark']}.{row['metric']} has seed "
            f"{row['seed']!r} more than once (subjects {subjects}); each seed must be counted once"
        )


def _names(field: str, names: Sequence[str]) -> list[str]:
    if isinstance(names, str):  # "fkl,rkl" would otherwise become ["f", "k", "l", ...]
        raise ValueError(f"{field} must be a sequence of names, got the string {names!r}")
    out = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{field}: every name must be a non-empty string, got {name!r}")
        if name in DELTA_VARIANTS:
            raise ValueError(f"{field}: {name!r} is the name of a difference row and cannot be a variant")
        out.append(name)
    return list(dict.fromkeys(out))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    std = float(np.std(array, ddof=1)) if len(array) >= 2 else 0.0
    return float(np.mean(array)), std


def _row(objective: str, variant: str, benchmark: str, metric: str, values: Sequence[float]) -> dict:
    mean, std = _mean_std(values)
    return {
        "objective": objective,
        "variant": variant,
        "benchmark": benchmark,
        "metric": metric,
        "mean": mean,
        "std": std,
        "n_seeds": len(values),
        "status": OK,
        "ci_low": math.nan,
        "ci_high": math.nan,
    }


def _empty_row(objective: str, variant: str, benchmark: str, metric: str, status: str) -> dict:
    return {
        "objective": objective,
        "variant": variant,
        "benchmark": benchmark,
        "metric": metric,
        "mean": math.nan,
        "std": math.nan,
        "n_seeds": 0,
        "status": status,
        "ci_low": math.nan,
        "ci_high": math.nan,
    }


def _seed_statistics(records: pd.DataFrame) -> pd.DataFrame:
    rows = [
        _row(*key, group["value"].astype(float).tolist()) for key, group in records.groupby(KEY, sort=False)
    ]
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _averages(records: pd.DataFrame) -> pd.DataFrame:
    """``average``/``score`` per (objective, variant): the mean of math and instruction accuracy."""
    present = [
        benchmark
        for benchmark, metric in ACCURACY_METRICS.items()
        if ((records["benchmark"] == benchmark) & (records["metric"] == metric)).any()
    ]
    if not present:
        return pd.DataFrame(columns=list(TABLE_COLUMNS))
    rows = []
    for (objective, variant), cell in records.groupby(["objective", "variant"], sort=False):
        per_benchmark = {
            benchmark: cell[
                (cell["benchmark"] == benchmark) & (cell["metric"] == ACCURACY_METRICS[benchmark])
            ]
            .set_index("seed")["value"]
            .astype(float)
            for benchmark in present
        }
        if any(series.empty for series in per_benchmark.values()):
            rows.append(_empty_row(objective, variant, AVERAGE, SCORE, INCOMPLETE))
            continue
        rows.append(_average_row(objective, variant, list(per_benchmark.values())))
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _average_row(objective: str, variant: str, per_benchmark: list[pd.Series]) -> dict:
    seed_sets = [set(series.index) for series in per_benchmark]
    if all(seeds == seed_sets[0] for seeds in seed_sets):
        # Same seeds (training seeds from MLflow): each seed is one run, so average within the run first
        # and let the spread across runs be the spread of that average.
        per_seed = pd.concat(per_benchmark, axis=1).mean(axis=1)
        return _row(objective, variant, AVERAGE, SCORE, per_seed.tolist())
    # Different seeds (greedy math vs sampling seeds for instruction): the numbers are not paired, so
    # combine the benchmark means and propagate their stds as independent errors of a mean.
    stats = [_mean_std(series.tolist()) for series in per_benchmark]
    k = len(stats)
    row = _row(objective, variant, AVERAGE, SCORE, [0.0])
    row["mean"] = float(np.mean([mean for mean, _ in stats]))
    row["std"] = math.sqrt(sum(std**2 for _, std in stats)) / k
    row["n_seeds"] = min(len(series) for series in per_benchmark)
    return row


def _expected_cells(variants: Sequence[str], objectives: Sequence[str]) -> list[tuple[str, str]]:
    cells = [(TEACHER, TEACHER)]
    cells += [(BEFORE_KD, variant) for variant in variants]
    cells += [(objective, variant) for objective in objectives for variant in variants]
    return cells


def _with_missing_cells(stats: pd.DataFrame, expected: Iterable[tuple[str, str]]) -> pd.DataFrame:
    present = set(zip(stats["objective"], stats["variant"], strict=True))
    measured = list(dict.fromkeys(zip(stats["benchmark"], stats["metric"], strict=True)))
    rows = [
        _empty_row(objective, variant, benchmark, metric, MISSING)
        for objective, variant in expected
        if (objective, variant) not in present
        for benchmark, metric in measured
    ]
    if not rows:
        return stats
    return pd.concat([stats, pd.DataFrame(rows, columns=list(TABLE_COLUMNS))], ignore_index=True)


def _deltas(stats: pd.DataFrame, variants: Sequence[str], expected: Sequence[str]) -> pd.DataFrame:
    """``<minuend>-<subtrahend>`` rows for every objective but the teacher, for each pair in DELTA_PAIRS.

    A variant outside the ``expected`` grid (e.g. the control student, evaluated only before KD) gives
    differences only where it has rows; elsewhere there is nothing missing, so no row."""
    indexed = stats.set_index(KEY)
    rows = []
    for minuend, subtrahend in DELTA_PAIRS:
        if minuend not in variants or subtrahend not in variants:
            continue
        name = delta_name(minuend, subtrahend)
        sides = stats[stats["variant"].isin([minuend, subtrahend]) & (stats["objective"] != TEACHER)]
        keys = dict.fromkeys(zip(sides["objective"], sides["benchmark"], sides["metric"], strict=True))
        for objective, benchmark, metric in keys:
            left = lookup(indexed, objective, minuend, benchmark, metric)
            right = lookup(indexed, objective, subtrahend, benchmark, metric)
            absent = [v for v, side in ((minuend, left), (subtrahend, right)) if side is None]
            if any(variant not in expected for variant in absent):
                continue
            if left is None or right is None or left["status"] != OK or right["status"] != OK:
                rows.append(_empty_row(objective, name, benchmark, metric, MISSING))
                continue
            rows.append(_difference_row(objective, name, benchmark, metric, left, right))
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _baseline_deltas(stats: pd.DataFrame, variants: Sequence[str], objectives: Sequence[str]) -> pd.DataFrame:
    """``<objective>-sft`` rows: each KD objective's accuracy minus the plain-SFT baseline's, per variant."""
    if BASELINE not in objectives:
        return pd.DataFrame(columns=list(TABLE_COLUMNS))
    indexed = stats.set_index(KEY)
    rows = []
    for objective in (o for o in objectives if o != BASELINE):
        for variant in variants:
            for benchmark, metric in TABLE1_BENCHMARKS.items():
                left = lookup(indexed, objective, variant, benchmark, metric)
                right = lookup(indexed, BASELINE, variant, benchmark, metric)
                if left is None and right is None:
                    continue
                name = baseline_name(objective)
                if left is None or right is None or left["status"] != OK or right["status"] != OK:
                    rows.append(_empty_row(name, variant, benchmark, metric, MISSING))
                    continue
                rows.append(_difference_row(name, variant, benchmark, metric, left, right))
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _difference_row(
    objective: str, variant: str, benchmark: str, metric: str, left: pd.Series, right: pd.Series
) -> dict:
    """left - right; the std as of independent errors (the interval, when there is one, is paired)."""
    row = _row(objective, variant, benchmark, metric, [0.0])
    row["mean"] = float(left["mean"] - right["mean"])
    row["std"] = math.sqrt(left["std"] ** 2 + right["std"] ** 2)
    row["n_seeds"] = int(min(left["n_seeds"], right["n_seeds"]))
    return row


def _with_intervals(
    stats: pd.DataFrame, items: Mapping[tuple[str, str], Mapping[str, Items]]
) -> pd.DataFrame:
    """Fill ``ci_low``/``ci_high`` of every accuracy difference whose two sides have item scores."""
    stats = stats.copy()
    for index, row in stats.iterrows():
        sides = _sides(row["objective"], row["variant"])
        benchmarks = INTERVAL_BENCHMARKS.get((row["benchmark"], row["metric"]))
        if sides is None or benchmarks is None or row["status"] != OK:
            continue
        left, right = (items.get(side) for side in sides)
        interval = paired_interval(left, right, benchmarks) if left and right else None
        if interval is not None:
            stats.loc[index, ["ci_low", "ci_high"]] = [interval.low, interval.high]
    return stats


def _sides(objective: str, variant: str) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """The (objective, variant) of a difference row's minuend and subtrahend; None for other rows."""
    if variant in DELTA_VARIANTS:
        minuend, subtrahend = variant.split("-", 1)
        return (objective, minuend), (objective, subtrahend)
    if objective.endswith(f"-{BASELINE}"):
        return (objective.removesuffix(f"-{BASELINE}"), variant), (BASELINE, variant)
    return None


def lookup(
    indexed: pd.DataFrame, objective: str, variant: str, benchmark: str, metric: str
) -> pd.Series | None:
    key = (objective, variant, benchmark, metric)
    return indexed.loc[key] if key in indexed.index else None


def _rank(order: Sequence[str], values: pd.Series) -> pd.Series:
    """Position in ``order``; values not in it come after, in the order they first appear."""
    ranks = {name: i for i, name in enumerate(order)}
    for name in values.unique():
        ranks.setdefault(name, len(ranks))
    return values.map(ranks)


def _ordered(stats: pd.DataFrame, variants: Sequence[str], objectives: Sequence[str]) -> pd.DataFrame:
    variant_order = [*variants, TEACHER, *[v for v in stats["variant"].unique() if v not in DELTA_VARIANTS]]
    variant_order = list(dict.fromkeys([*variant_order, *DELTA_VARIANTS]))
    ranks = pd.DataFrame(
        {
            "objective": _rank([*REFERENCE_OBJECTIVES, *objectives], stats["objective"]),
            "variant": _rank(variant_order, stats["variant"]),
            "benchmark": _rank(BENCHMARK_ORDER, stats["benchmark"]),
            "metric": _rank(METRIC_ORDER, stats["metric"]),
        }
    )
    order = ranks.sort_values(["objective", "variant", "benchmark", "metric"], kind="stable").index
    table = stats.loc[order, list(TABLE_COLUMNS)].reset_index(drop=True)
    return table.astype({"mean": float, "std": float, "n_seeds": int, "ci_low": float, "ci_high": float})


def _seed_sort_key(seed: str) -> tuple[int, float, str]:
    try:
        return (0, float(seed), seed)
    except ValueError:
        return (1, 0.0, seed)
