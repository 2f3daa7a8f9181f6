"""Nodes of the `distill` pipeline: the KD set every cell shares, and one KD run per grid cell."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from warmup_distill_kedro import grid
from warmup_distill_kedro.core.kd.cache import TeacherTopK, cache_teacher
from warmup_distill_kedro.core.kd.cell import distill_cell
from warmup_distill_kedro.core.kd.data import prepare_kd_examples, select_sft_examples
from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.grid import Cell
from warmup_distill_kedro.pipelines.distill.params import DistillParams


def kd_examples(teacher: Checkpoint, train_examples: pd.DataFrame, params: DistillParams) -> pd.DataFrame:
    """The KD training set of every cell: the selected training examples (with `sequence_kd`, the teacher's
    greedy responses in place of the gold ones)."""
    return prepare_kd_examples(teacher, train_examples, params.data)


def sft_examples(train_examples: pd.DataFrame, params: DistillParams) -> pd.DataFrame:
    """The gold examples of the plain-SFT baseline: the student's labelled data."""
    return select_sft_examples(train_examples, params.sft_examples)


def teacher_topk(teacher: Checkpoint, kd_examples: pd.DataFrame, params: DistillParams) -> TeacherTopK:
    """The teacher's top-k log-probabilities at every response position of the KD set, computed once for
    every token-level cell (distill.teacher_cache)."""
    return cache_teacher(
        teacher,
        kd_examples,
        params.teacher_cache,
        params.temperature,
        params.max_length,
        params.prompt_overflow,
    )


def cell_function(cell: Cell) -> Callable[..., tuple[Checkpoint, dict[str, Any]]]:
    """The node function of one grid cell: `distill_cell` with its variant and objective bound."""

    def distill(
        teacher: Checkpoint,
        student: Checkpoint,
        examples: pd.DataFrame,
        validation_examples: pd.DataFrame,
        params: DistillParams,
        cache: TeacherTopK | None = None,
    ) -> tuple[Checkpoint, dict[str, Any]]:
        """Distill the teacher into a copy of the cell's starting student with the cell's objective and
        training seed (the teacher read from its cache when the cell is given one)."""
        seeded = params.model_copy(
            update={"training": params.training.model_copy(update={"seed": cell.seed})}
        )
        return distill_cell(
            teacher, student, examples, validation_examples, seeded, cell.variant, cell.objective, cache
        )

    distill.__name__ = distill.__qualname__ = grid.node_name("distill", cell.name)
    return distill
