"""Nodes of the `check` pipeline: the teacher scores the student's rollouts and corrects the flagged ones."""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.core.warmup import corrected_set
from warmup_distill_kedro.pipelines.check.params import CheckParams
from warmup_distill_kedro.reporting.plots import sampled_token_probabilities


def score_rollouts(rollouts: pd.DataFrame, teacher: Checkpoint, params: CheckParams) -> pd.DataFrame:
    """The teacher's log-probability of every sampled token and the rule's verdict, one row per rollout."""
    return corrected_set.score_rollouts(rollouts, teacher, params)


def build_corrected_set(
    scored_rollouts: pd.DataFrame, teacher: Checkpoint, params: CheckParams
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(prompt, chosen = corrected, rejected = original) pairs, and the check's statistics."""
    return corrected_set.build_corrected_set(scored_rollouts, teacher, params)


def plot_teacher_probabilities(scored_rollouts: pd.DataFrame, params: CheckParams) -> Figure:
    """Histogram of the teacher's probability of every token the student sampled."""
    return sampled_token_probabilities(
        scored_rollouts["teacher_logprobs"].tolist(), params.tau_probability, params.histogram_bins
    )
