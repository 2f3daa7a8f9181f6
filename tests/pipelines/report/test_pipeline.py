"""The `report` pipeline on an in-memory catalog, built for the grid {vanilla, warmup} x {fkl}: each variant's
results, the table of every subject's evaluation, its Markdown (wide, ending with the explain section, and
compact), and the plots (the warmup mismatch and what warmup moved because warmup is in the grid)."""

from __future__ import annotations

import pandas as pd
import pytest
from matplotlib.figure import Figure

from tests.helpers import evaluation, markdown_rows, row, run_pipeline, uniform_explain_records
from warmup_distill_kedro.pipelines.check.params import CheckParams
from warmup_distill_kedro.pipelines.distill.params import DistillParams
from warmup_distill_kedro.pipelines.report.pipeline import create_pipeline

TRAINING = {"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3}


def _curves(kd: list[float]) -> dict:
    return {"history": [{"step": step + 1, "kd": value} for step, value in enumerate(kd)]}


def test_the_table_markdown_and_plots_of_a_grid(use_grid):
    use_grid(["vanilla", "warmup"], ["fkl"])
    pipeline = create_pipeline()
    assert {n.name for n in pipeline.nodes} == {
        "vanilla.collect_vanilla",
        "warmup.collect_warmup",
        "control.collect_control",
        "build_report",
        "build_compact_report",
        "plot_accuracy",
        "plot_kd_curves",
        "plot_warmup_mismatch",
        "plot_explain_fkl",
        "plot_explain_warmup",
        "summarize_explain",
        "add_explain_section",
    }
    exact_match = {
        "teacher": 0.9,
        "vanilla.before_kd": 0.30,
        "warmup.before_kd": 0.32,
        "control.before_kd": 0.31,
        "vanilla.fkl": 0.40,
        "warmup.fkl": 0.46,
    }
    data = {
        f"{subject}.evaluation_metrics": evaluation(
            subject,
            *(("teacher", "teacher") if subject == "teacher" else subject.split(".")),
            value,
            counts=[1] * 20,
        )
        for subject, value in exact_match.items()
    }
    predictions = {f"{s}.predictions": pd.DataFrame({"finished": [True]}) for s in exact_match}
    outputs = run_pipeline(
        pipeline,
        {
            **data,
            **predictions,
            "vanilla.fkl.distill_metrics": _curves([0.9, 0.6]),
            "warmup.fkl.distill_metrics": _curves([0.7, 0.5]),
            "params:distill": DistillParams(
                variants=["vanilla", "warmup"], objectives=["fkl"], training=TRAINING
            ),
            "params:check": CheckParams(tau=0.1),
            **{
                f"{subject}.explain_tokens": uniform_explain_records(subject, kl)
                for subject, kl in {
                    "teacher": 0.0,
                    "vanilla.before_kd": 0.4,
                    "vanilla.fkl": 0.1,
                    "warmup.before_kd": 0.3,
                    "control.before_kd": 0.35,
                    "warmup.fkl": 0.05,
                }.items()
            },
            "explain_rejected": pd.DataFrame(
                {
                    "token_class": ["digit", "operator", "eos", "formatting", "word"],
                    "rejected": [3, 1, 0, 0, 0],
                    "rejected_share": [0.75, 0.25, 0, 0, 0],
                    "token_share": [0.5, 0.1, 0.1, 0.2, 0.1],
                }
            ),  # fmt: skip
        },
    )
    table = outputs["report_table"]
    assert row(table, "fkl", "warmup-vanilla", "math", "exact_match")["mean"] == pytest.approx(0.06)
    assert row(table, "before_kd", "warmup-control", "math", "exact_match")["mean"] == pytest.approx(0.01)
    assert row(table, "teacher", "teacher", "math", "exact_match")["mean"] == pytest.approx(0.9)
    assert (table["status"] == "ok").all()
    markdown = outputs["report_markdown"]
    assert markdown.startswith("# Warmup-Distill") and "+6.0" in markdown
    compact = outputs["report_compact"]
    assert "| fkl " in compact and "+6.0" in compact and max(map(len, compact.splitlines())) <= 100
    for name in ("accuracy", "kd_curves", "warmup_mismatch", "explain_fkl", "explain_warmup"):
        assert isinstance(outputs[f"report_{name}_plot"], Figure), name
    # The explain section ends the report and embeds the plots of this run (datasets.ReportMarkdownDataset
    # turns the links into paths).
    assert markdown.startswith(outputs["report_tables_markdown"].rstrip("\n"))
    explain = markdown[markdown.index("## What distillation moved") :]
    assert "(report-plot:report_explain_fkl.png)" in explain
    assert "(report-plot:report_explain_warmup.png)" in explain
    assert markdown_rows(explain, "fkl")[0][:3] == ["fkl", "vanilla", "-0.3"]
    curves = outputs["report_kd_curves_plot"].get_axes()[0].get_lines()
    assert [(line.get_label(), list(line.get_ydata())) for line in curves] == [
        ("vanilla", [0.9, 0.6]),
        ("warmup", [0.7, 0.5]),
    ]
    mismatch = outputs["report_warmup_mismatch_plot"].get_axes()[0].get_lines()
    assert [line.get_label().split(" (")[0] for line in mismatch] == [
        "before warmup",
        "after warmup",
        "tau = 0.1",
    ]


def test_without_warmup_in_the_grid_there_is_no_mismatch_plot(use_grid):
    use_grid(["vanilla"], ["fkl", "js"])
    pipeline = create_pipeline()
    assert not {"plot_warmup_mismatch", "plot_explain_warmup"} & {n.name for n in pipeline.nodes}
    assert {"plot_explain_fkl", "plot_explain_js"} <= {n.name for n in pipeline.nodes}
    subjects = ("vanilla.before_kd", "vanilla.fkl", "vanilla.js")
    assert pipeline.inputs() == {
        # no explain_rejected: warmup is not in the grid
        *(f"{s}.explain_tokens" for s in ("teacher", *subjects)),
        "params:distill",
        "teacher.evaluation_metrics",
        *(f"{s}.evaluation_metrics" for s in subjects),
        *(f"{s}.predictions" for s in subjects),
        "vanilla.fkl.distill_metrics",
        "vanilla.js.distill_metrics",
    }
    # The report reads one input per variant: the variant's results, gathered in its namespace.
    [report] = [n for n in pipeline.nodes if n.name == "build_report"]
    assert report.inputs == ["params:distill", "teacher.evaluation_metrics", "vanilla.results"]
