"""Nodes of the `warmup` pipeline: the warmup student and its fairness control (core.warmup.warmup)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.core.warmup import warmup
from warmup_distill_kedro.core.warmup.warmup import WarmupConfig


def warmup_student(
    student: Checkpoint,
    corrected_set: pd.DataFrame,
    validation_examples: pd.DataFrame,
    params: WarmupConfig,
    teacher: Checkpoint | None = None,
) -> tuple[Checkpoint, dict[str, Any]]:
    """The vanilla student trained on the corrected set's (corrected, original) pairs (the teacher is an
    input only with loss.reference: teacher)."""
    return warmup.warmup_student(student, corrected_set, validation_examples, params, teacher)


def control_student(
    student: Checkpoint,
    corrected_set: pd.DataFrame,
    train_examples: pd.DataFrame,
    validation_examples: pd.DataFrame,
    params: WarmupConfig,
) -> tuple[Checkpoint, dict[str, Any]]:
    """The vanilla student given warmup's steps as plain SFT on the same prompts' gold responses."""
    return warmup.control_student(student, corrected_set, train_examples, validation_examples, params)
