"""95% intervals of the report's differences, from a paired bootstrap over the test items.

Two models scored on the same test problems differ item by item; a difference of accuracies is the mean
of those item differences, and its uncertainty comes from which problems the test set happens to hold. With
several training seeds, it also comes from which runs training happened to give. Each bootstrap replicate
draws the runs (training seeds, with replacement; a side that is one model, such as a student before KD,
is that model in every run) and, independently, the test items (with replacement, the same items for both
sides: paired), and takes the mean item difference over what it drew; the interval is the 2.5th and 97.5th
percentiles of the replicates (the percentile bootstrap). The average of math and Rouge-L draws each
benchmark's items on its own and the runs once. A difference whose interval excludes zero is *resolved*:
the report marks it; any other reads as "no measurable difference".

Item scores come from each evaluation JSON's `items` (core.evaluation.evaluate): math 1/0, Rouge-L per
instruction averaged over its sampling seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

CONFIDENCE = 0.95
RESAMPLES = 4000
BOOTSTRAP_SEED = 0

# A run's item scores: benchmark -> scores indexed by example id.
Items = dict[str, pd.Series]


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        return excludes_zero(self.low, self.high)


def excludes_zero(low: float, high: float) -> bool:
    """Whether an interval excludes zero: a difference the test set and the seeds can measure (resolved)."""
    return low > 0 or high < 0


def run_items(evaluations: Mapping[str, Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, Items]]:
    """(objective, variant) -> run -> benchmark -> item scores, from the evaluation JSONs; the run is the
    training seed ("-" for a model evaluated once). Evaluations without `items` contribute nothing."""
    out: dict[tuple[str, str], dict[str, Items]] = {}
    for name, evaluation in evaluations.items():
        blocks = evaluation.get("items") or {}
        items = {}
        for benchmark, block in blocks.items():
            ids, scores = block.get("example_ids"), block.get("scores")
            if ids is None or scores is None or len(ids) != len(scores):
                raise ValueError(
                    f"evaluation {name!r}: field 'items.{benchmark}' must hold example_ids and scores of "
                    "the same length"
                )
            items[benchmark] = pd.Series(scores, index=[str(i) for i in ids], dtype=float)
        if items:
            run = str(evaluation.get("training_seed", "-"))
            out.setdefault((evaluation["objective"], evaluation["variant"]), {})[run] = items
    return out


def paired_interval(
    minuend: Mapping[str, Items],
    subtrahend: Mapping[str, Items],
    benchmarks: Sequence[str],
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Interval | None:
    """The mean over `benchmarks` of the item difference minuend - subtrahend, with its percentile interval.

    Runs pair by training seed; a side with one run is paired with every run of the other. None when a
    side lacks a benchmark or the runs do not pair. Items must be the same on both sides (the same test
    problems), else ValueError.
    """
    runs = _paired_runs(minuend, subtrahend)
    measured = all(b in minuend[x] and b in subtrahend[y] for b in benchmarks for x, y in runs)
    if not runs or not measured:
        return None
    rng = np.random.default_rng(seed)
    n_runs = len(runs)
    run_weights = rng.multinomial(n_runs, [1 / n_runs] * n_runs, size=resamples) / n_runs  # (B, S)
    estimate, replicates = 0.0, np.zeros(resamples)
    for benchmark in benchmarks:
        differences = np.stack([_difference(minuend[a][benchmark], subtrahend[b][benchmark], benchmark)
                                for a, b in runs])  # fmt: skip
        n_items = differences.shape[1]
        item_weights = rng.multinomial(n_items, [1 / n_items] * n_items, size=resamples) / n_items  # (B, N)
        estimate += differences.mean()
        replicates += np.einsum("bs,sn,bn->b", run_weights, differences, item_weights)
    k = len(benchmarks)
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(replicates / k, [tail, 1 - tail])
    return Interval(estimate / k, float(low), float(high))


def _paired_runs(minuend: Mapping[str, Items], subtrahend: Mapping[str, Items]) -> list[tuple[str, str]]:
    if len(minuend) == 1:
        (only,) = minuend
        return [(only, run) for run in subtrahend]
    if len(subtrahend) == 1:
        (only,) = subtrahend
        return [(run, only) for run in minuend]
    return [(run, run) for run in minuend if run in subtrahend]


def _difference(a: pd.Series, b: pd.Series, benchmark: str) -> np.ndarray:
    if set(a.index) != set(b.index):
        raise ValueError(
            f"paired interval on {benchmark}: the two models were scored on different test items "
            f"({len(a)} and {len(b)} items, {len(set(a.index) ^ set(b.index))} not shared); evaluate both "
            "with the same evaluate parameters"
        )
    return (a - b.reindex(a.index)).to_numpy(dtype=float)
