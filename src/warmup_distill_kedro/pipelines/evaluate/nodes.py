"""Nodes of the `evaluate` pipeline: one model measured the same way as every other."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from warmup_distill_kedro import grid
from warmup_distill_kedro.core.evaluation.evaluate import EvaluateConfig, evaluate_model
from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.grid import Subject
from warmup_distill_kedro.pipelines.check.params import CheckParams


def evaluate_teacher(
    teacher: Checkpoint, test_examples: pd.DataFrame, params: EvaluateConfig, check: CheckParams
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The teacher, measured like the students (no KL to itself; it judges its own samples)."""
    return evaluate_model(teacher, None, test_examples, params, check, "teacher", "teacher", "teacher")


def student_evaluation(subject: Subject) -> Callable[..., tuple[dict[str, Any], pd.DataFrame]]:
    """The node function for one student: `evaluate_model` with its subject, variant and objective bound."""

    def evaluate(
        student: Checkpoint,
        teacher: Checkpoint,
        test_examples: pd.DataFrame,
        params: EvaluateConfig,
        check: CheckParams,
    ) -> tuple[dict[str, Any], pd.DataFrame]:
        """The student's scores (with its training seed when the grid has several), and every prediction
        it made."""
        metrics, predictions = evaluate_model(
            student, teacher, test_examples, params, check, subject.name, subject.variant, subject.objective
        )
        if subject.seed is not None:
            metrics["training_seed"] = subject.seed
        return metrics, predictions

    evaluate.__name__ = evaluate.__qualname__ = grid.node_name("evaluate", subject.name)
    return evaluate
