"""Supervised fine-tuning of a model built from a config: how the demo makes its teacher and its student.

The model learns the gold responses of the first `max_train_examples` training examples (or, with
`train_on_references`, every valid reference response, which spreads its probability mass over them),
token-mean cross-entropy on the response tokens, validated by the gold NLL of the validation split.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedTokenizerBase

from warmup_distill_kedro.core.evaluation.likelihood import validation_nll_fn
from warmup_distill_kedro.core.models.encoding import (
    PromptOverflowParameter,
    causal_lm_loss,
    collate,
    encode_examples,
)
from warmup_distill_kedro.core.models.modeling import Checkpoint, ModelSize, build_model, count_parameters
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids
from warmup_distill_kedro.core.training.batches import ShuffledBatches
from warmup_distill_kedro.core.training.config import TrainingConfig
from warmup_distill_kedro.core.training.stage import train_stage

logger = logging.getLogger(__name__)

VALIDATION_EXAMPLES = 256  # enough for a stable validation NLL, cheap at every evaluation


class SFTConfig(BaseModel):
    """Build one model from a config and fine-tune it on the gold responses of the training split."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSize
    training: TrainingConfig
    max_length: int = Field(192, gt=8, description="prompt + response tokens; longer responses are cut")
    prompt_overflow: PromptOverflowParameter = "error"
    max_train_examples: int | None = Field(None, gt=0, description="limit the gold data this model sees")
    train_on_references: bool = Field(
        False,
        description="learn every valid reference response, not only the gold one (spreads the model's mass)",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    seed: int = 0


def sft_from_config(
    tokenizer: PreTrainedTokenizerBase,
    train_examples: pd.DataFrame,
    validation_examples: pd.DataFrame,
    config: SFTConfig,
    role: str,
) -> tuple[Checkpoint, dict[str, Any]]:
    """A model built from `config.model` with `tokenizer`'s vocabulary, fine-tuned on the training split."""
    model = build_model(config.model, tokenizer, seed=config.seed)
    encoded, report = encode_examples(
        tokenizer, training_examples(train_examples, config), config.max_length, config.prompt_overflow
    )
    validation, _ = encode_examples(
        tokenizer, validation_examples.head(VALIDATION_EXAMPLES), config.max_length, config.prompt_overflow
    )
    _, pad_id = eos_and_pad_ids(tokenizer)
    label_smoothing = config.label_smoothing

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        return causal_lm_loss(model, batch, label_smoothing=label_smoothing)

    logger.info(
        "%s: %d parameters, %d training sequences (%d cut at max_length %d)",
        role, count_parameters(model), report.n_examples, report.n_truncated, config.max_length,
    )  # fmt: skip
    checkpoint, metrics = train_stage(
        model,
        tokenizer,
        loss_fn,
        ShuffledBatches(
            encoded, config.training.batch_size, lambda b: collate(b, pad_id), config.training.seed
        ),
        config.training,
        stage="bootstrap",
        name=f"sft {role}",
        params=config,
        eval_fn=validation_nll_fn(validation, pad_id, config.training.batch_size),
        role=role,
        metadata={"train_sequences": report.n_examples, "truncated_sequences": report.n_truncated},
    )
    metrics.update(
        parameters=count_parameters(checkpoint.model),
        train_sequences=report.n_examples,
        truncated_sequences=report.n_truncated,
        truncated_prompts=report.n_prompts_truncated,
    )
    return checkpoint, metrics


def training_examples(examples: pd.DataFrame, config: SFTConfig) -> pd.DataFrame:
    """The examples a model learns from: the first N gold examples, optionally every reference of each."""
    if config.max_train_examples is not None:
        examples = examples.head(config.max_train_examples)
    if not config.train_on_references:
        return examples
    expanded = examples.explode("references")
    return expanded.assign(response=expanded["references"]).reset_index(drop=True)
