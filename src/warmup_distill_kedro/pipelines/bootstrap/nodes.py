"""Nodes of the `bootstrap` pipeline (demo only): tokenizers, then a teacher and a student trained by SFT.

With real checkpoints (`kedro run --env gpu`) this pipeline is not run: the catalog points
`teacher_model` and `student_model` at local Hugging Face folders instead.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from warmup_distill_kedro.core.evaluation.generated import math_accuracy
from warmup_distill_kedro.core.evaluation.likelihood import validation_nll_fn
from warmup_distill_kedro.core.models.encoding import causal_lm_loss, collate, encode_examples
from warmup_distill_kedro.core.models.modeling import Checkpoint, build_model, count_parameters
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids, train_bpe_tokenizer
from warmup_distill_kedro.core.tasks import RESPONSE_SEPARATOR
from warmup_distill_kedro.core.training.batches import ShuffledBatches
from warmup_distill_kedro.core.training.loop import TrainingRun
from warmup_distill_kedro.pipelines.bootstrap.params import EvalParams, SFTParams, TokenizerParams
from warmup_distill_kedro.tracking import log_step_metrics

logger = logging.getLogger(__name__)

_VALIDATION_EXAMPLES = 256  # enough for a stable validation NLL, cheap at every eval


def build_tokenizers(
    train_examples: pd.DataFrame, params: TokenizerParams
) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    """Train the student's tokenizer, and the teacher's own when one is configured."""
    corpus = _corpus(train_examples)
    student = train_bpe_tokenizer(corpus, params.student)
    teacher = student if params.teacher is None else train_bpe_tokenizer(corpus, params.teacher)
    logger.info("tokenizers: student %d ids, teacher %d ids", len(student), len(teacher))
    return student, teacher


def _corpus(examples: pd.DataFrame) -> list[str]:
    texts = [
        f"{p}{RESPONSE_SEPARATOR}{r}" for p, r in zip(examples["prompt"], examples["response"], strict=True)
    ]
    # Alternative references teach the tokenizer the variants the teacher will be trained on, too.
    texts += [ref for refs in examples["references"] for ref in refs]
    return texts


def sft_model(
    tokenizer: PreTrainedTokenizerBase,
    train_examples: pd.DataFrame,
    validation_examples: pd.DataFrame,
    params: SFTParams,
    role: str,
) -> tuple[Checkpoint, dict[str, float]]:
    """Build a model from its config and fine-tune it on gold (or all reference) responses."""
    model = build_model(params.model, tokenizer, seed=params.seed)
    train = _training_pairs(train_examples, params)
    encoded, report = encode_examples(tokenizer, train, params.max_length, params.prompt_overflow)
    validation, _ = encode_examples(
        tokenizer, validation_examples.head(_VALIDATION_EXAMPLES), params.max_length, params.prompt_overflow
    )
    _, pad_id = eos_and_pad_ids(tokenizer)
    label_smoothing = params.label_smoothing

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        return causal_lm_loss(model, batch, label_smoothing=label_smoothing)

    logger.info(
        "%s: %d parameters, %d training sequences (%d cut at max_length %d)",
        role,
        count_parameters(model),
        report.n_examples,
        report.n_truncated,
        params.max_length,
    )
    run = TrainingRun(
        model,
        loss_fn,
        ShuffledBatches(
            encoded, params.training.batch_size, lambda b: collate(b, pad_id), params.training.seed
        ),
        params.training,
        eval_fn=validation_nll_fn(validation, pad_id, params.training.batch_size),
        metrics_sink=log_step_metrics,
        name=f"sft {role}",
    )
    result = run.run()
    metadata = {
        "role": role,
        "stage": "bootstrap",
        "parameters": count_parameters(result.model),
        "train_sequences": report.n_examples,
        "truncated_sequences": report.n_truncated,
        "steps": result.steps,
        "params": params.model_dump(mode="json"),
    }
    metrics = {
        "parameters": float(count_parameters(result.model)),
        "train_sequences": float(report.n_examples),
        "truncated_sequences": float(report.n_truncated),
        "truncated_prompts": float(report.n_prompts_truncated),
        **{k.replace("eval/", "final_"): v for k, v in result.final_eval.items()},
    }
    return Checkpoint(model=result.model, tokenizer=tokenizer, metadata=metadata), metrics


def _training_pairs(examples: pd.DataFrame, params: SFTParams) -> pd.DataFrame:
    """The examples this model learns from: the first N gold examples, optionally every reference."""
    if params.max_train_examples is not None:
        examples = examples.head(params.max_train_examples)
    if not params.train_on_references:
        return examples
    expanded = examples.explode("references")
    return expanded.assign(response=expanded["references"]).reset_index(drop=True)


def train_teacher(tokenizer, train_examples, validation_examples, params: SFTParams):
    return sft_model(tokenizer, train_examples, validation_examples, params, role="teacher")


def train_student(tokenizer, train_examples, validation_examples, params: SFTParams):
    return sft_model(tokenizer, train_examples, validation_examples, params, role="student")


def evaluate_bootstrap(
    teacher: Checkpoint, student: Checkpoint, test_examples: pd.DataFrame, params: EvalParams
) -> dict[str, Any]:
    """Math exact match of both models on the test split: the gap distillation has to close."""
    math = test_examples[test_examples["task"] == "math"]
    if params.max_examples is not None:
        math = math.head(params.max_examples)
    summary: dict[str, Any] = {"math_test_examples": len(math)}
    for role, checkpoint in (("teacher", teacher), ("student", student)):
        accuracy, _ = math_accuracy(
            checkpoint.model, checkpoint.tokenizer, math, params.sampling, desc=f"eval {role}"
        )
        summary[f"{role}_math_exact_match"] = accuracy
        summary[f"{role}_parameters"] = count_parameters(checkpoint.model)
    logger.info(
        "bootstrap done: teacher %.1f%%, student %.1f%% math exact match on %d test problems",
        100 * summary["teacher_math_exact_match"],
        100 * summary["student_math_exact_match"],
        len(math),
    )
    return summary
