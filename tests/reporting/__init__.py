"""Tests of the reporting package; ``evaluation`` builds an evaluation JSON in the producers' contract,
``row`` picks one row of a comparison table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

EDGES = [i / 20 for i in range(21)]


def evaluation(
    subject: str,
    variant: str,
    objective: str,
    exact_match: float | None = 0.4,
    rouge: Sequence[float] | None = (0.50, 0.51, 0.52),
    kl: float | None = 0.1,
    rejected: float | None = 0.07,
    counts: Sequence[int] | None = None,
) -> dict[str, Any]:
    """One evaluation JSON; None for a benchmark or statistic means it was not measured."""
    return {
        "subject": subject,
        "variant": variant,
        "objective": objective,
        "math": None if exact_match is None else {"exact_match": exact_match, "n_examples": 500},
        "instruction": None
        if rouge is None
        else {
            "rouge_l": sum(rouge) / len(rouge),
            "rouge_l_std": 0.01,
            "rouge_l_per_seed": {str(seed): value for seed, value in enumerate(rouge)},
            "n_seeds": len(rouge),
            "n_examples": 100,
        },
        "distribution": {
            "heldout_nll": 0.2,
            "heldout_kl": kl,
            "heldout_entropy": 0.3,
            "teacher_heldout_entropy": 0.25,
            "rejected_share": rejected,
            "n_sampled_tokens": 9000,
            "teacher_prob_histogram": None if counts is None else {"edges": EDGES, "counts": list(counts)},
        },
    }


def row(table: pd.DataFrame, objective: str, variant: str, benchmark: str, metric: str) -> pd.Series:
    match = table[
        (table["objective"] == objective)
        & (table["variant"] == variant)
        & (table["benchmark"] == benchmark)
        & (table["metric"] == metric)
    ]
    assert len(match) == 1, (objective, variant, benchmark, metric)
    return match.iloc[0]
