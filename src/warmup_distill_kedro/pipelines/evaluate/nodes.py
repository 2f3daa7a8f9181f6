"""Nodes of the `evaluate` pipeline: one model measured the same way as every other."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from warmup_distill_kedro.core.evaluation.generated import (
    instruction_rouge,
    math_accuracy,
    sampled_token_check,
)
from warmup_distill_kedro.core.evaluation.likelihood import heldout_distribution
from warmup_distill_kedro.core.evaluation.metrics import probability_histogram
from warmup_distill_kedro.core.models.encoding import encode_examples
from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids, vocabulary_fingerprint
from warmup_distill_kedro.pipelines.check.params import CheckParams
from warmup_distill_kedro.pipelines.evaluate.params import EvaluateParams

logger = logging.getLogger(__name__)


def evaluate_model(
    model: Checkpoint,
    teacher: Checkpoint | None,
    test_examples: pd.DataFrame,
    params: EvaluateParams,
    check: CheckParams,
    subject: str,
    variant: str,
    objective: str,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Math exact match, Rouge-L over seeds and the distribution statistics of one model.

    `teacher` None: the model is the teacher (no KL to itself; it judges its own samples).
    Returns the metrics (the evaluation JSON the report reads) and every prediction. A benchmark whose
    task has no test examples is `None`, not zero.
    """
    math = _head(test_examples[test_examples["task"] == "math"], params.math_examples)
    instructions = _head(test_examples[test_examples["task"] != "math"], params.instruction_examples)
    if math.empty and instructions.empty:
        raise ValueError("evaluate: test_examples has no rows to evaluate")
    sampling = params.sampling
    predictions = []
    metrics: dict[str, Any] = {"subject": subject, "variant": variant, "objective": objective}

    metrics["math"] = None
    if not math.empty:
        accuracy, rows = math_accuracy(model.model, model.tokenizer, math, sampling, desc=f"math {subject}")
        metrics["math"] = {"exact_match": accuracy, "n_examples": len(math)}
        predictions.append(rows.assign(task="math"))

    metrics["instruction"] = None
    if not instructions.empty:
        scores, rows = instruction_rouge(
            model.model, model.tokenizer, instructions, sampling, params.rouge_seeds, desc=f"rouge {subject}"
        )
        values = np.array(list(scores.values()))
        metrics["instruction"] = {
            "rouge_l": float(values.mean()),
            "rouge_l_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "rouge_l_per_seed": {str(seed): score for seed, score in scores.items()},
            "n_seeds": len(values),
            "n_examples": len(instructions),
        }
        predictions.append(rows.assign(task="instruction"))

    metrics["distribution"] = _distribution(model, teacher, test_examples, params, check)
    _log(metrics)
    return metrics, pd.concat(predictions, ignore_index=True)


def _distribution(
    model: Checkpoint,
    teacher: Checkpoint | None,
    test_examples: pd.DataFrame,
    params: EvaluateParams,
    check: CheckParams,
) -> dict[str, Any]:
    """Held-out NLL/entropy/KL on gold test responses; the share of sampled tokens the teacher rejects."""
    _, pad_id = eos_and_pad_ids(model.tokenizer)
    gold, _ = encode_examples(
        model.tokenizer,
        test_examples.head(params.heldout_examples),
        params.max_length,
        params.prompt_overflow,
    )
    shares_vocabulary = teacher is not None and vocabulary_fingerprint(
        teacher.tokenizer
    ) == vocabulary_fingerprint(model.tokenizer)
    statistics: dict[str, Any] = heldout_distribution(
        model.model,
        teacher.model if teacher is not None else None,
        gold,
        pad_id,
        params.batch_size,
        len(model.tokenizer) if shares_vocabulary else None,
    )
    statistics.setdefault("heldout_kl", None)
    statistics.setdefault("teacher_heldout_entropy", None)
    statistics.update(rejected_share=None, n_sampled_tokens=0, teacher_prob_histogram=None)
    if params.check_prompts > 0:
        judge = teacher if teacher is not None else model  # the teacher judges its own samples too
        prompts = test_examples["prompt"].drop_duplicates().head(params.check_prompts).tolist()
        share, probabilities = sampled_token_check(
            model.model, model.tokenizer, judge.model, judge.tokenizer, prompts, params.sampling, check
        )
        statistics.update(
            rejected_share=share,
            n_sampled_tokens=len(probabilities),
            teacher_prob_histogram=probability_histogram(probabilities, params.histogram_bins),
        )
    return statistics


def _head(examples: pd.DataFrame, n: int | None) -> pd.DataFrame:
    return examples if n is None else examples.head(n)


def _log(metrics: dict[str, Any]) -> None:
    math, instruction, distribution = metrics["math"], metrics["instruction"], metrics["distribution"]
    logger.info(
        "evaluate %s: math %s, Rouge-L %s, rejected share %s",
        metrics["subject"],
        f"{100 * math['exact_match']:.1f}%" if math else "-",
        f"{100 * instruction['rouge_l']:.1f} ± {100 * instruction['rouge_l_std']:.1f}"
        if instruction
        else "-",
        f"{100 * distribution['rejected_share']:.1f}%" if distribution["rejected_share"] is not None else "-",
    )


def evaluate_teacher(
    teacher: Checkpoint, test_examples: pd.DataFrame, params: EvaluateParams, check: CheckParams
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The teacher, measured like the students (no KL to itself; it judges its own samples)."""
    return evaluate_model(teacher, None, test_examples, params, check, "teacher", "teacher", "teacher")


def student_evaluation(subject: str, variant: str, objective: str) -> Callable[..., Any]:
    """The node function for one student: `evaluate_model` with its subject, variant and objective bound."""

    def evaluate(
        student: Checkpoint,
        teacher: Checkpoint,
        test_examples: pd.DataFrame,
        params: EvaluateParams,
        check: CheckParams,
    ) -> tuple[dict[str, Any], pd.DataFrame]:
        return evaluate_model(student, teacher, test_examples, params, check, subject, variant, objective)

    evaluate.__name__ = evaluate.__qualname__ = f"evaluate_{subject.replace('.', '_')}"
    return evaluate
