"""Evaluation JSONs (one per evaluated model) -> one long table of records, one row per measured number.

Every later step (the comparison table, the plots, the MLflow comparison) reads this one shape:
``subject, variant, objective, benchmark, metric, seed, value``. A number is a record only when it was
measured: a ``null`` benchmark or statistic produces no record, so "not measured" and "missing" stay
distinguishable downstream.

The ``seed`` is what a value's spread is over. A model evaluated once (the teacher, a student before KD,
a cell of a one-seed grid) has its Rouge-L per sampling seed. A distilled student of a grid with several
training seeds (its JSON has ``training_seed``) is one of several runs of its cell: each of its numbers is
one record under its training seed (Rouge-L averaged over the sampling seeds), so that the cell's spread
is over training runs, as in ``kedro compare``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import pandas as pd

RECORD_COLUMNS = ("subject", "variant", "objective", "benchmark", "metric", "seed", "value")

MATH = "math"
INSTRUCTION = "instruction"
DISTRIBUTION = "distribution"

# Math is decoded greedily once, so its only "seed" says how it was decoded; distribution statistics
# are deterministic given the model and the held-out set.
GREEDY_SEED = "greedy"
DETERMINISTIC_SEED = "-"

DISTRIBUTION_METRICS = ("heldout_nll", "heldout_kl", "heldout_entropy", "rejected_share")
IDENTITY_FIELDS = ("subject", "variant", "objective")


def evaluation_records(evaluations: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One record per measured number of every evaluation JSON, with columns ``RECORD_COLUMNS``.

    ``evaluations`` maps a name (the dataset or subject name, used in error messages) to the JSON:
    math -> one record (seed ``greedy``), instruction -> one per key of ``rouge_l_per_seed``,
    distribution -> one per non-null statistic of ``DISTRIBUTION_METRICS`` (seed ``-``).
    Raises ValueError naming the entry and the field when a field is missing or a value is not a number,
    and when two entries claim the same subject (they would be counted twice).
    """
    if not isinstance(evaluations, Mapping):
        raise ValueError(
            f"evaluations must be a mapping of name -> evaluation dict, got {type(evaluations).__name__}"
        )
    rows: list[dict[str, Any]] = []
    claimed: dict[str, str] = {}
    for name, evaluation in evaluations.items():
        identity = _identity(name, evaluation)
        if identity["subject"] in claimed:
            raise ValueError(
                f"evaluation {name!r}: subject {identity['subject']!r} is also the subject of "
                f"{claimed[identity['subject']]!r}; each model must be evaluated once"
            )
        claimed[identity["subject"]] = name
        measurements = _measurements(name, evaluation)
        training_seed = evaluation.get("training_seed")
        if training_seed is not None:
            measurements = _per_training_seed(name, measurements, training_seed)
        rows.extend({**identity, **measurement} for measurement in measurements)
    table = pd.DataFrame(rows, columns=list(RECORD_COLUMNS))
    return table.astype({"seed": str, "value": float})


def _identity(name: str, evaluation: Any) -> dict[str, str]:
    if not isinstance(evaluation, Mapping):
        raise ValueError(f"evaluation {name!r}: expected a dict, got {type(evaluation).__name__}")
    identity = {}
    for field in IDENTITY_FIELDS:
        value = evaluation.get(field)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"evaluation {name!r}: field {field!r} must be a non-empty string, got {value!r}"
            )
        identity[field] = value
    return identity


def _measurements(name: str, evaluation: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The (benchmark, metric, seed, value) of one evaluation, in the order benchmarks are reported."""
    out: list[dict[str, Any]] = []
    math_block = _block(name, evaluation, MATH)
    if math_block is not None:
        value = _number(name, f"{MATH}.exact_match", math_block.get("exact_match"))
        out.append(_measurement(MATH, "exact_match", GREEDY_SEED, value))
        if math_block.get("flexible_match") is not None:  # evaluations before it have none
            flexible = _number(name, f"{MATH}.flexible_match", math_block["flexible_match"])
            out.append(_measurement(MATH, "flexible_match", GREEDY_SEED, flexible))
    instruction = _block(name, evaluation, INSTRUCTION)
    if instruction is not None:
        per_seed = instruction.get("rouge_l_per_seed")
        if not isinstance(per_seed, Mapping) or not per_seed:
            raise ValueError(
                f"evaluation {name!r}: field '{INSTRUCTION}.rouge_l_per_seed' must be a non-empty dict "
                f"of sampling seed -> ROUGE-L, got {per_seed!r}"
            )
        for seed, raw in per_seed.items():
            value = _number(name, f"{INSTRUCTION}.rouge_l_per_seed.{seed}", raw)
            out.append(_measurement(INSTRUCTION, "rouge_l", str(seed), value))
    distribution = _block(name, evaluation, DISTRIBUTION)
    if distribution is not None:
        for metric in DISTRIBUTION_METRICS:
            raw = distribution.get(metric)
            if raw is None:  # not measured (the teacher has no KL against itself)
                continue
            value = _number(name, f"{DISTRIBUTION}.{metric}", raw)
            out.append(_measurement(DISTRIBUTION, metric, DETERMINISTIC_SEED, value))
    return out


def _per_training_seed(name: str, measurements: list[dict[str, Any]], seed: Any) -> list[dict[str, Any]]:
    """One record per (benchmark, metric) under the training seed: the sampling seeds' mean."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"evaluation {name!r}: field 'training_seed' must be an integer, got {seed!r}")
    by_metric: dict[tuple[str, str], list[float]] = {}
    for measurement in measurements:
        by_metric.setdefault((measurement["benchmark"], measurement["metric"]), []).append(
            measurement["value"]
        )
    return [
        _measurement(benchmark, metric, str(seed), sum(values) / len(values))
        for (benchmark, metric), values in by_metric.items()
    ]


def _block(name: str, evaluation: Mapping[str, Any], benchmark: str) -> Mapping[str, Any] | None:
    block = evaluation.get(benchmark)
    if block is None:
        return None
    if not isinstance(block, Mapping):
        raise ValueError(
            f"evaluation {name!r}: field {benchmark!r} must be a dict or null, got {type(block).__name__}"
        )
    return block


def _number(name: str, field: str, value: Any) -> float:
    # bool is an int subclass but never a measurement; NaN would silently poison every mean downstream.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"evaluation {name!r}: field {field!r} must be a number, got {value!r}")
    return float(value)


def _measurement(benchmark: str, metric: str, seed: str, value: float) -> dict[str, Any]:
    return {"benchmark": benchmark, "metric": metric, "seed": seed, "value": value}
