"""Evaluation of a model on held-out examples."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from warmup_distill_kedro.core.encoding import EncodedExample, causal_lm_loss, collate
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


@torch.no_grad()
def response_nll(
    model: torch.nn.Module, encoded: Sequence[EncodedExample], pad_id: int, batch_size: int
) -> float:
    """Token-mean negative log-likelihood of the response tokens (the SFT loss, without smoothing)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0.0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], pad_id)
        loss, metrics = causal_lm_loss(model, {k: v.to(device) for k, v in batch.items()})
        total += loss.item() * metrics["tokens"]
        tokens += metrics["tokens"]
    model.train(was_training)
    return total / max(tokens, 1.0)
