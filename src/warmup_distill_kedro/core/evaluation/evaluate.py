"""Every model of the flow measured the same way: the teacher, the students before distillation and every
distilled student see the same test examples, seeds and budgets, so that their numbers compare.

`evaluate_model` returns the evaluation JSON the report reads (math exact match, strict and flexible,
Rouge-L per sampling seed, the distribution statistics, and each test item's score: `items`, what the
report's paired intervals resample) and every prediction.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from warmup_distill_kedro.core.evaluation.generated import (
    instruction_rouge,
    math_accuracy,
    sampled_token_check,
)
from warmup_distill_kedro.core.evaluation.likelihood import heldout_distribution
from warmup_distill_kedro.core.evaluation.metrics import probability_histogram
from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.models.chat import require_chat_template
from warmup_distill_kedro.core.models.encoding import PromptOverflowParameter, encode_examples
from warmup_distill_kedro.core.models.modeling import Checkpoint, count_parameters
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids, vocabulary_fingerprint
from warmup_distill_kedro.core.warmup.check import CheckConfig

logger = logging.getLogger(__name__)

# Which math score the report's headline is: the strict `#### N` match, the format the flow trains on
# (the flexible one, the response's last number, is reported beside it).
MATH_HEADLINE = "exact_match"


class EvaluateConfig(BaseModel):
    """What every model (teacher, students before KD, every distilled student) is measured on.

    Every model sees the same test examples, seeds and budgets, so the numbers compare.
    """

    model_config = ConfigDict(extra="forbid")

    math_examples: int | None = Field(500, gt=0, description="test math problems, greedy; null: all")
    instruction_examples: int | None = Field(100, gt=0, description="test instructions; null: all")
    rouge_seeds: list[int] = Field([0, 1, 2], min_length=1, description="sampling seeds for Rouge-L")
    sampling: SamplingConfig = Field(
        SamplingConfig(max_new_tokens=48, batch_size=128, temperature=1.0, top_p=1.0),
        description="decoding for Rouge-L and the check statistic (math is always greedy)",
    )
    heldout_examples: int = Field(256, gt=0, description="gold test responses for NLL, entropy and KL")
    check_prompts: int = Field(256, ge=0, description="test prompts sampled once for the rejected share")
    histogram_bins: int = Field(20, ge=5, le=200, description="teacher-probability histogram bins")
    batch_size: int = Field(64, gt=0, description="sequences per forward pass for the held-out statistics")
    max_length: int = Field(192, gt=8)
    prompt_overflow: PromptOverflowParameter = "error"


def evaluate_model(
    model: Checkpoint,
    teacher: Checkpoint | None,
    test_examples: pd.DataFrame,
    config: EvaluateConfig,
    check: CheckConfig,
    subject: str,
    variant: str,
    objective: str,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Math exact match, Rouge-L over seeds and the distribution statistics of one model.

    `teacher` None: the model is the teacher (no KL to itself; it judges its own samples).
    Returns the metrics (the evaluation JSON the report reads) and every prediction. A benchmark whose
    task has no test examples is `None`, not zero. `items` holds each test item's score per benchmark
    (math: 1/0 exact match; instruction: Rouge-L averaged over the sampling seeds), as lists of example
    ids and scores: the report pairs two models on the same items.
    """
    math = _head(test_examples[test_examples["task"] == "math"], config.math_examples)
    instructions = _head(test_examples[test_examples["task"] != "math"], config.instruction_examples)
    if math.empty and instructions.empty:
        raise ValueError("evaluate: test_examples has no rows to evaluate")
    if config.sampling.prompt_format == "chat":  # before any generation, for the model and its judge
        for checkpoint in (model, teacher) if teacher is not None else (model,):
            require_chat_template(checkpoint.tokenizer, "evaluate.sampling.prompt_format")
    sampling = config.sampling
    predictions = []
    metrics: dict[str, Any] = {"subject": subject, "variant": variant, "objective": objective}
    items: dict[str, dict[str, list]] = {}

    metrics["math"] = None
    if not math.empty:
        accuracy, rows = math_accuracy(model.model, model.tokenizer, math, sampling, desc=f"math {subject}")
        metrics["math"] = {
            "exact_match": accuracy,  # strict: the `#### N` line
            "flexible_match": float(rows["correct_flexible"].mean()),  # the response's last number
            "headline": MATH_HEADLINE,
            "n_examples": len(math),
        }
        items["math"] = _item_scores(rows["example_id"], rows["correct"].astype(float))
        predictions.append(rows.assign(task="math"))

    metrics["instruction"] = None
    if not instructions.empty:
        scores, rows = instruction_rouge(
            model.model, model.tokenizer, instructions, sampling, config.rouge_seeds, desc=f"rouge {subject}"
        )
        values = np.array(list(scores.values()))
        metrics["instruction"] = {
            "rouge_l": float(values.mean()),
            "rouge_l_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "rouge_l_per_seed": {str(seed): score for seed, score in scores.items()},
            "n_seeds": len(values),
            "n_examples": len(instructions),
        }
        per_item = rows.groupby("example_id", sort=False)["rouge_l"].mean()
        items["instruction"] = _item_scores(per_item.index, per_item)
        predictions.append(rows.assign(task="instruction"))

    metrics["distribution"] = _distribution(model, teacher, test_examples, config, check)
    metrics["items"] = items
    _log(metrics)
    return metrics, pd.concat(predictions, ignore_index=True)


def _distribution(
    model: Checkpoint,
    teacher: Checkpoint | None,
    test_examples: pd.DataFrame,
    config: EvaluateConfig,
    check: CheckConfig,
) -> dict[str, Any]:
    """Held-out NLL/entropy/KL on gold test responses; the share of sampled tokens the teacher rejects."""
    _, pad_id = eos_and_pad_ids(model.tokenizer)
    gold, _ = encode_examples(
        model.tokenizer,
        test_examples.head(config.heldout_examples),
        config.max_length,
        config.prompt_overflow,
        config.sampling.prompt_format,
    )
    shares_vocabulary = teacher is not None and vocabulary_fingerprint(
        teacher.tokenizer
    ) == vocabulary_fingerprint(model.tokenizer)
    statistics: dict[str, Any] = heldout_distribution(
        model.model,
        teacher.model if teacher is not None else None,
        gold,
        pad_id,
        config.batch_size,
        len(model.tokenizer) if shares_vocabulary else None,
    )
    statistics.setdefault("heldout_kl", None)
    statistics.setdefault("teacher_heldout_entropy", None)
    statistics.update(rejected_share=None, n_sampled_tokens=0, teacher_prob_histogram=None)
    if config.check_prompts > 0:
        judge = teacher if teacher is not None else model  # the teacher judges its own samples too
        prompts = test_examples["prompt"].drop_duplicates().head(config.check_prompts).tolist()
        share, probabilities = sampled_token_check(
            model.model, model.tokenizer, judge.model, judge.tokenizer, prompts, config.sampling, check
        )
        statistics.update(
            rejected_share=share,
            n_sampled_tokens=len(probabilities),
            teacher_prob_histogram=probability_histogram(probabilities, config.histogram_bins),
        )
    return statistics


def _item_scores(example_ids: Any, scores: Any) -> dict[str, list]:
    return {"example_ids": [str(i) for i in example_ids], "scores": [float(v) for v in scores]}


def _head(examples: pd.DataFrame, n: int | None) -> pd.DataFrame:
    return examples if n is None else examples.head(n)


def _log(metrics: dict[str, Any]) -> None:
    math, instruction, distribution = metrics["math"], metrics["instruction"], metrics["distribution"]
    logger.info(
        "evaluate %s: math %s, Rouge-L %s, rejected share %s",
        metrics["subject"],
        f"{100 * math['exact_match']:.1f}% (last number {100 * math['flexible_match']:.1f}%)"
        if math
        else "-",
        f"{100 * instruction['rouge_l']:.1f} ± {100 * instruction['rouge_l_std']:.1f}"
        if instruction
        else "-",
        f"{100 * distribution['rejected_share']:.1f}%" if distribution["rejected_share"] is not None else "-",
    )


def math_exact_match_of(
    models: dict[str, Checkpoint],
    test_examples: pd.DataFrame,
    max_examples: int | None,
    sampling: SamplingConfig,
) -> dict[str, Any]:
    """Math exact match of each model (by role) on the first `max_examples` math test problems, greedy:
    `<role>_math_exact_match` and `<role>_parameters`, with `math_test_examples`."""
    math = _head(test_examples[test_examples["task"] == "math"], max_examples)
    summary: dict[str, Any] = {"math_test_examples": len(math)}
    for role, checkpoint in models.items():
        accuracy, _ = math_accuracy(
            checkpoint.model, checkpoint.tokenizer, math, sampling, desc=f"eval {role}"
        )
        summary[f"{role}_math_exact_match"] = accuracy
        summary[f"{role}_parameters"] = count_parameters(checkpoint.model)
    return summary
