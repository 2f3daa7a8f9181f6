"""pipelines/report/nodes.py: the report node reads one evaluation per subject, in the order it was built
for; the plot nodes hand their inputs to the figures."""

from __future__ import annotations

import pytest
from matplotlib.figure import Figure

from tests.helpers import evaluation, row
from warmup_distill_kedro.pipelines.check.params import CheckParams
from warmup_distill_kedro.pipelines.distill.params import DistillParams
from warmup_distill_kedro.pipelines.report.nodes import (
    TITLE,
    curves_function,
    plot_warmup_mismatch,
    report_function,
)

PARAMS = DistillParams(
    variants=["vanilla"],
    objectives=["fkl"],
    training={"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3},
)


def test_the_report_pairs_each_evaluation_with_its_subject():
    build_report = report_function(["teacher", "vanilla.before_kd", "vanilla.fkl"])
    table, markdown = build_report(
        PARAMS,
        evaluation("teacher", "teacher", "teacher", 0.9, kl=None),
        evaluation("vanilla.before_kd", "vanilla", "before_kd", 0.3),
        evaluation("vanilla.fkl", "vanilla", "fkl", 0.45),
    )
    assert row(table, "fkl", "vanilla", "math", "exact_match")["mean"] == pytest.approx(0.45)
    assert row(table, "before_kd", "vanilla", "math", "exact_match")["mean"] == pytest.approx(0.3)
    assert row(table, "teacher", "teacher", "math", "exact_match")["mean"] == pytest.approx(0.9)
    assert (table["status"] == "ok").all()
    assert markdown.startswith(f"# {TITLE}\n")
    with pytest.raises(ValueError):  # an evaluation short: the subjects no longer line up
        build_report(PARAMS, evaluation("teacher", "teacher", "teacher"))


def test_the_warmup_mismatch_marks_tau_only_for_a_probability_rule():
    counts = [0] * 19 + [5]
    before = evaluation("vanilla.before_kd", "vanilla", "before_kd", counts=[5] + [0] * 19)
    after = evaluation("warmup.before_kd", "warmup", "before_kd", counts=counts)
    figure = plot_warmup_mismatch(before, after, CheckParams(tau=0.2))
    [axis] = figure.get_axes()
    labels = [line.get_label() for line in axis.get_lines()]
    assert labels == [
        "before warmup (100.0% of tokens below tau)",
        "after warmup (0.0% of tokens below tau)",
        "tau = 0.2",
    ]
    margin = plot_warmup_mismatch(before, after, CheckParams(rule="margin", tau=1.0))
    assert [line.get_label() for line in margin.get_axes()[0].get_lines()] == [
        "before warmup",
        "after warmup",
    ]


def test_the_kd_curves_node_labels_each_variant():
    plot = curves_function(["vanilla", "warmup"], "js")
    history = {"history": [{"step": 1, "kd": 0.5}, {"step": 2, "kd": 0.4}]}
    figure = plot(history, history)
    assert isinstance(figure, Figure)
    assert [line.get_label() for line in figure.get_axes()[0].get_lines()] == ["vanilla", "warmup"]
    assert figure.get_suptitle().startswith("js")
