"""Nodes of the `report` pipeline: the paper's table and plots from the evaluation metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from warmup_distill_kedro.pipelines.check.params import CheckParams
from warmup_distill_kedro.pipelines.distill.params import DistillParams
from warmup_distill_kedro.reporting.markdown import render_markdown, summary_lines
from warmup_distill_kedro.reporting.plots import (
    accuracy_by_objective,
    kd_loss_curves,
    teacher_probability_histograms,
)
from warmup_distill_kedro.reporting.records import evaluation_records
from warmup_distill_kedro.reporting.table import build_table

logger = logging.getLogger(__name__)

TITLE = "Warmup-Distill: objective x {vanilla, warmup}"


def report_function(subjects: Sequence[str]) -> Callable[..., tuple[pd.DataFrame, str]]:
    """The report node for these evaluation subjects: params:distill, then one input per subject."""

    def build_report(params: DistillParams, *evaluations: dict[str, Any]) -> tuple[pd.DataFrame, str]:
        """The long table (CSV) and its Markdown rendering; every expected grid cell is accounted for."""
        table = build_table(
            evaluation_records(dict(zip(subjects, evaluations, strict=True))),
            params.variants,
            params.objectives,
        )
        for line in summary_lines(table):
            logger.info("report: %s", line)
        return table, render_markdown(table, title=TITLE)

    return build_report


def plot_accuracy(table: pd.DataFrame) -> Figure:
    return accuracy_by_objective(table)


def plot_warmup_mismatch(before: dict[str, Any], after: dict[str, Any], check: CheckParams) -> Figure:
    """The teacher's probability of the student's sampled tokens before and after warmup."""
    return teacher_probability_histograms(
        {"before warmup": before, "after warmup": after}, check.tau_probability
    )


def curves_function(variants: Sequence[str], objective: str) -> Callable[..., Figure]:
    """The KD-curves node for one objective: one distill metrics input per variant."""

    def plot_kd_curves(*metrics: dict[str, Any]) -> Figure:
        return kd_loss_curves(dict(zip(variants, metrics, strict=True)), objective)

    return plot_kd_curves
