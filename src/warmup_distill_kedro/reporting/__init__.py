"""Reporting: evaluation JSONs -> records -> the comparison table, its Markdown and the report figures.

No Kedro here (pandas, numpy, matplotlib only), so the report can be rebuilt from saved JSONs, from a
notebook, or from MLflow (``warmup_distill_kedro.compare``) without a session.
"""

from warmup_distill_kedro.reporting.plots import (
    accuracy_by_objective,
    kd_loss_curves,
    teacher_probability_histograms,
)
from warmup_distill_kedro.reporting.records import RECORD_COLUMNS, evaluation_records
from warmup_distill_kedro.reporting.table import (
    TABLE_COLUMNS,
    build_table,
    render_markdown,
    summary_lines,
)

__all__ = [
    "RECORD_COLUMNS",
    "TABLE_COLUMNS",
    "accuracy_by_objective",
    "build_table",
    "evaluation_records",
    "kd_loss_curves",
    "render_markdown",
    "summary_lines",
    "teacher_probability_histograms",
]
