"""Nodes of the `bootstrap` pipeline (demo only): tokenizers, then a teacher and a student trained by SFT.

With real checkpoints (`kedro run --env gpu`) this pipeline is not run: the catalog points
`teacher_model` and `student_model` at local Hugging Face folders instead.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from transformers import PreTrainedTokenizerBase

from warmup_distill_kedro.core.evaluation.evaluate import math_exact_match_of
from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.core.models.tokenization import train_bpe_tokenizer
from warmup_distill_kedro.core.tasks import training_texts
from warmup_distill_kedro.core.training.sft import SFTConfig, sft_from_config
from warmup_distill_kedro.pipelines.bootstrap.params import EvalParams, TokenizerParams

logger = logging.getLogger(__name__)


def build_tokenizers(
    train_examples: pd.DataFrame, params: TokenizerParams
) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    """Train the student's tokenizer, and the teacher's own when one is configured."""
    corpus = training_texts(train_examples)
    student = train_bpe_tokenizer(corpus, params.student)
    teacher = student if params.teacher is None else train_bpe_tokenizer(corpus, params.teacher)
    logger.info("tokenizers: student %d ids, teacher %d ids", len(student), len(teacher))
    return student, teacher


def train_teacher(
    tokenizer: PreTrainedTokenizerBase,
    train_examples: pd.DataFrame,
    validation_examples: pd.DataFrame,
    params: SFTConfig,
) -> tuple[Checkpoint, dict[str, Any]]:
    """The teacher, built from its config and fine-tuned on the training split."""
    return sft_from_config(tokenizer, train_examples, validation_examples, params, role="teacher")


def train_student(
    tokenizer: PreTrainedTokenizerBase,
    train_examples: pd.DataFrame,
    validation_examples: pd.DataFrame,
    params: SFTConfig,
) -> tuple[Checkpoint, dict[str, Any]]:
    """The student, built from its config and fine-tuned on its gold examples."""
    return sft_from_config(tokenizer, train_examples, validation_examples, params, role="student")


def evaluate_bootstrap(
    teacher: Checkpoint, student: Checkpoint, test_examples: pd.DataFrame, params: EvalParams
) -> dict[str, Any]:
    """Math exact match of both models on the test split: the gap distillation has to close."""
    summary = math_exact_match_of(
        {"teacher": teacher, "student": student}, test_examples, params.max_examples, params.sampling
    )
    logger.info(
        "bootstrap done: teacher %.1f%%, student %.1f%% math exact match on %d test problems",
        100 * summary["teacher_math_exact_match"],
        100 * summary["student_math_exact_match"],
        summary["math_test_examples"],
    )
    return summary
