"""Nodes of the `report` pipeline: the paper's table and plots from the evaluation metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from warmup_distill_kedro.pipelines.check.params import CheckParams
from warmup_distill_kedro.pipelines.distill.params import DistillParams
from warmup_distill_kedro.reporting.markdown import explain_section, render_markdown, summary_lines
from warmup_distill_kedro.reporting.plots import (
    accuracy_by_objective,
    explain_objective,
    explain_warmup,
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


def explain_section_function(plots: Mapping[str, str]) -> Callable[..., str]:
    """The node that ends the report with the explain section, embedding `plots` ({objective or
    "warmup": file}); inputs: the report's Markdown, explain_changes, then explain_rejected when warmup is
    compared."""

    def add_explain_section(
        markdown: str, changes: pd.DataFrame, rejected: pd.DataFrame | None = None
    ) -> str:
        return "\n".join([markdown.rstrip("\n"), "", *explain_section(changes, rejected, plots)])

    return add_explain_section


def explain_plot_function(objective: str) -> Callable[[pd.DataFrame], Figure]:
    """The node that plots where KD with `objective` moved each variant's student."""

    def plot_explain(changes: pd.DataFrame) -> Figure:
        return explain_objective(changes, objective)

    plot_explain.__name__ = plot_explain.__qualname__ = f"plot_explain_{objective}"
    return plot_explain


def plot_explain_warmup(changes: pd.DataFrame, rejected: pd.DataFrame) -> Figure:
    """What warmup moved before KD, against the classes of the tokens the check rejected."""
    return explain_warmup(changes, rejected)
