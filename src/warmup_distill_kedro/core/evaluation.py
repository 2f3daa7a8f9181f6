"""Evaluation of a model on held-out examples."""

from __future__ import annotations

import pandas as pd
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from warmup_distill_kedro.core.sampling import SamplingConfig, generate
from warmup_distill_kedro.core.tasks import math_exact_match


def math_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: pd.DataFrame,
    sampling: SamplingConfig,
    desc: str = "math eval",
) -> tuple[float, pd.DataFrame]:
    """Exact match of the final `#### N` answer under greedy decoding; returns the rate and the rows."""
    if examples.empty:
        raise ValueError("no math examples to evaluate")
    greedy = sampling.model_copy(update={"do_sample": False})
    generations = generate(model, tokenizer, examples["prompt"].tolist(), greedy, desc=desc)
    predictions = examples[["example_id", "prompt", "answer"]].copy()
    predictions["prediction"] = [g.text for g in generations]
    predictions["finished"] = [g.finished for g in generations]
    predictions["correct"] = [
        math_exact_match(g.text, answer) for g, answer in zip(generations, examples["answer"], strict=True)
    ]
    return float(predictions["correct"].mean()), predictions
