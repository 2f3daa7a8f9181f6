"""Nodes of the `explain` pipeline: per-token records of every model, and the classes of the rejected tokens
(the report pipeline summarises them)."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from warmup_distill_kedro.core.evaluation.evaluate import EvaluateConfig
from warmup_distill_kedro.core.evaluation.explain import (
    ExplainConfig,
    rejected_token_classes,
    token_records,
)
from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.grid import Subject


def explain_teacher(
    teacher: Checkpoint, test_examples: pd.DataFrame, params: ExplainConfig, evaluate: EvaluateConfig
) -> pd.DataFrame:
    """The teacher's records: its own entropy and top tokens, KL 0 (the reference row)."""
    return token_records(teacher, teacher, test_examples, params, evaluate, "teacher", "teacher", "teacher")


def student_explanation(subject: Subject) -> Callable[..., pd.DataFrame]:
    """The node function for one student: `token_records` with its subject, variant and objective bound."""

    def explain(
        student: Checkpoint,
        teacher: Checkpoint,
        test_examples: pd.DataFrame,
        params: ExplainConfig,
        evaluate: EvaluateConfig,
    ) -> pd.DataFrame:
        """One record per held-out gold response token: class, position, KL (split), NLL."""
        return token_records(
            student,
            teacher,
            test_examples,
            params,
            evaluate,
            subject.name,
            subject.variant,
            subject.objective,
        )

    explain.__name__ = explain.__qualname__ = f"explain_{subject.name.replace('.', '_')}"
    return explain


def explain_rejected_tokens(corrected_set: pd.DataFrame, student: Checkpoint) -> pd.DataFrame:
    """The token classes of what the check rejected, in the vanilla student's tokens."""
    return rejected_token_classes(corrected_set, student.tokenizer)
