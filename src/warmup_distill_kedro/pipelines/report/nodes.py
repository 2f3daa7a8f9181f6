"""Nodes of the `report` pipeline: the paper's table and plots from the evaluation metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from warmup_distill_kedro import grid
from warmup_distill_kedro.core.evaluation.explain import changes, group_means, headline
from warmup_distill_kedro.pipelines.check.params import CheckParams
from warmup_distill_kedro.pipelines.distill.params import DistillParams
from warmup_distill_kedro.reporting.intervals import run_items
from warmup_distill_kedro.reporting.markdown import (
    compact_markdown,
    explain_section,
    render_markdown,
    summary_lines,
)
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


def build_report(
    params: DistillParams, teacher: dict[str, Any], *results: dict[str, Any]
) -> tuple[pd.DataFrame, str]:
    """The long table (CSV) and its Markdown rendering from the teacher's evaluation and each variant's
    results; every expected grid cell is accounted for."""
    evaluations = {grid.TEACHER: teacher}
    for variant_results in results:
        evaluations |= variant_results["evaluations"]
    table = build_table(
        evaluation_records(evaluations), params.variants, params.objectives, run_items(evaluations)
    )
    table.attrs["training_seeds"] = params.seeds
    for line in summary_lines(table):
        logger.info("report: %s", line)
    return table, render_markdown(table, title=TITLE)


def collect_function(
    subjects: Sequence[str], cells: Sequence[str], explained: Sequence[str] = ()
) -> Callable[..., dict[str, Any]]:
    """A variant's collect node: its subjects' evaluations, then their predictions, then its cells' training
    metrics, then the explain records of its `explained` subjects, gathered by name (`<variant>.results`)."""
    n_subjects, n_cells = len(subjects), len(cells)

    def collect(*inputs: Any) -> dict[str, Any]:
        evaluations, predictions = inputs[:n_subjects], inputs[n_subjects : 2 * n_subjects]
        training = inputs[2 * n_subjects : 2 * n_subjects + n_cells]
        explain = inputs[2 * n_subjects + n_cells :]
        return {
            "evaluations": dict(zip(subjects, evaluations, strict=True)),
            "predictions": {s: prediction_summary(p) for s, p in zip(subjects, predictions, strict=True)},
            "training": dict(zip(cells, training, strict=True)),
            "explain": dict(zip(explained, explain, strict=True)),
        }

    return collect


def explain_summary_function(
    comparisons: Sequence[tuple[str, str]],
) -> Callable[..., tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]]:
    """The node that summarises the explain records, the teacher's and each variant's (from its results):
    means by token class / position / task, their changes for `comparisons` (before, after), and each
    change over every token."""

    def summarize_explain(
        teacher: pd.DataFrame, *results: dict[str, Any]
    ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
        records = [teacher, *(r for variant in results for r in variant["explain"].values())]
        table = group_means(records)
        changed = changes(table, comparisons)
        return table, changed, headline(changed)

    return summarize_explain


def prediction_summary(predictions: pd.DataFrame) -> dict[str, Any]:
    """How many predictions a model wrote, and the share that ended before the token budget."""
    finished = predictions["finished"].mean() if "finished" in predictions else None
    return {"rows": len(predictions), "finished_share": None if pd.isna(finished) else float(finished)}


def render_compact(table: pd.DataFrame) -> str:
    """The report as the demo's last screen shows it: one narrow table per benchmark."""
    return compact_markdown(table, title=TITLE)


def plot_accuracy(table: pd.DataFrame) -> Figure:
    return accuracy_by_objective(table)


def plot_warmup_mismatch(vanilla: dict[str, Any], warmup: dict[str, Any], check: CheckParams) -> Figure:
    """The teacher's probability of the student's sampled tokens before and after warmup (each variant's
    student before KD, from its results)."""
    before = vanilla["evaluations"][f"vanilla.{grid.BEFORE_KD}"]
    after = warmup["evaluations"][f"warmup.{grid.BEFORE_KD}"]
    return teacher_probability_histograms(
        {"before warmup": before, "after warmup": after}, check.tau_probability
    )


def curves_function(runs: Mapping[str, str], objective: str) -> Callable[..., Figure]:
    """The KD-curves node for one objective: one results input per variant; `runs`: variant -> the cell
    run whose curves it plots (the first training seed's)."""

    def plot_kd_curves(*results: dict[str, Any]) -> Figure:
        metrics = {
            variant: variant_results["training"][run]
            for (variant, run), variant_results in zip(runs.items(), results, strict=True)
        }
        return kd_loss_curves(metrics, objective)

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
