"""Metrics of text and numbers, no model involved.

* ``rouge_l``: Rouge-L F1 with stemming, the best over a prompt's references (the DSKD evaluation).
* ``probability_histogram``: counts of probabilities in equal bins, small enough for a JSON metric file.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from rouge_score import rouge_scorer


@lru_cache(maxsize=1)
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Rouge-L F1 (stemmed) of `prediction` against its closest reference; 0.0 for an empty prediction."""
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    scorer = _rouge_l_scorer()
    return max(scorer.score(reference, prediction)["rougeL"].fmeasure for reference in references)


def probability_histogram(probabilities: np.ndarray, bins: int = 20) -> dict[str, list]:
    """Counts of `probabilities` in `bins` equal bins over [0, 1] (1.0 falls in the last bin)."""
    counts, edges = np.histogram(np.asarray(probabilities, dtype=np.float64), bins=bins, range=(0.0, 1.0))
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}
