"""Nodes of the `report` pipeline: the paper's table and plots from the evaluation metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from warmup_distill_kedro.pipelines.check.params import CheckParams
from warmup_distill_kedro.pipelines.distill.params import DistillParams
from warmup_distill_kedro.reporting import (
    accuracy_by_objective,
    build_table,
    evaluation_records,
    kd_loss_curves,
    render_markdown,
    summary_lines,
    teacher_probability_histograms,
)

logger = logging.getLogger(__name__)

TITLE = "Warmup-Distill: objective x {vanilla, warmup}"


def report_function(subjects: Sequence[str]) -> Callable[..., tuple[pd.DataFrame, str]]:
    """The report node for these evaluation subjects: params:distill, then one input per subject."""

    def build_report(params: DistillParams, *evaluations: dict[str, Any]) -> tuple[pd.DataFrame, str]:
        return report(dict(zip(subjects, evaluations, strict=True)), params)

    return build_report


def report(evaluations: dict[str, dict[str, Any]], params: DistillParams) -> tuple[pd.DataFrame, str]:
    """The long table (CSV) and its Markdown rendering; every expected grid cell is accounted for."""
    table = build_table(evaluation_records(evaluations), params.variants, params.objectives)
    markdown = render_markdown(table, title=TITLE)
    for line in summary_lines(table):
        logger.info("report: %s", line)
    return table, markdown


def plot_accuracy(table: pd.DataFrame) -> plt.Figure:
    return accuracy_by_objective(table)


def plot_warmup_mismatch(before: dict[str, Any], after: dict[str, Any], check: CheckParams) -> plt.Figure:
    """The teacher's probability of the student's sampled tokens before and after warmup."""
    tau = check.tau if check.rule == "teacher_prob" else None
    return teacher_probability_histograms({"student": before, "warmup_student": after}, tau=tau)


def curves_function(variants: Sequence[str], objective: str) -> Callable[..., plt.Figure]:
    """The KD-curves node for one objective: one distill metrics input per variant."""

    def plot_kd_curves(*metrics: dict[str, Any]) -> plt.Figure:
        return kd_loss_curves(dict(zip(variants, metrics, strict=True)), objective)

    return plot_kd_curves
