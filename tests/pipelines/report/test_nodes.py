"""pipelines/report/nodes.py: each variant's collect node gathers its subjects and cells by name, the report
node reads the teacher and the variants' results; the plot nodes hand their inputs to the figures."""

from __future__ import annotations

import pandas as pd
import pytest
from matplotlib.figure import Figure

from tests.helpers import evaluation, row
from warmup_distill_kedro.pipelines.check.params import CheckParams
from warmup_distill_kedro.pipelines.distill.params import DistillParams
from warmup_distill_kedro.pipelines.report.nodes import (
    TITLE,
    build_report,
    collect_function,
    curves_function,
    plot_warmup_mismatch,
)

PARAMS = DistillParams(
    variants=["vanilla"],
    objectives=["fkl"],
    training={"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3},
)


def _results(variant: str, evaluations: dict, training: dict | None = None) -> dict:
    """A variant's results as its collect node writes them."""
    return {"evaluations": evaluations, "predictions": {}, "training": training or {}}


def test_a_variants_results_pair_each_input_with_its_subject_or_cell():
    collect = collect_function(["vanilla.before_kd", "vanilla.fkl"], ["vanilla.fkl"])
    predictions = pd.DataFrame({"finished": [True, True, False, True]})
    results = collect(
        evaluation("vanilla.before_kd", "vanilla", "before_kd", 0.3),
        evaluation("vanilla.fkl", "vanilla", "fkl", 0.45),
        predictions.head(2),
        predictions,
        {"history": [], "steps": 2},
    )
    assert results["evaluations"]["vanilla.fkl"]["math"]["exact_match"] == 0.45
    assert results["predictions"] == {
        "vanilla.before_kd": {"rows": 2, "finished_share": 1.0},
        "vanilla.fkl": {"rows": 4, "finished_share": 0.75},
    }
    assert results["training"] == {"vanilla.fkl": {"history": [], "steps": 2}}
    with pytest.raises(ValueError):  # an input short: the names no longer line up
        collect(evaluation("vanilla.before_kd", "vanilla", "before_kd"))


def test_the_report_reads_the_teacher_and_each_variants_results():
    vanilla = {
        "vanilla.before_kd": evaluation("vanilla.before_kd", "vanilla", "before_kd", 0.3),
        "vanilla.fkl": evaluation("vanilla.fkl", "vanilla", "fkl", 0.45),
    }
    table, markdown = build_report(
        PARAMS, evaluation("teacher", "teacher", "teacher", 0.9, kl=None), _results("vanilla", vanilla)
    )
    assert row(table, "fkl", "vanilla", "math", "exact_match")["mean"] == pytest.approx(0.45)
    assert row(table, "before_kd", "vanilla", "math", "exact_match")["mean"] == pytest.approx(0.3)
    assert row(table, "teacher", "teacher", "math", "exact_match")["mean"] == pytest.approx(0.9)
    assert (table["status"] == "ok").all()
    assert markdown.startswith(f"# {TITLE}\n")


def test_the_warmup_mismatch_marks_tau_only_for_a_probability_rule():
    counts = [0] * 19 + [5]
    before = evaluation("vanilla.before_kd", "vanilla", "before_kd", counts=[5] + [0] * 19)
    after = evaluation("warmup.before_kd", "warmup", "before_kd", counts=counts)
    before = _results("vanilla", {"vanilla.before_kd": before})
    after = _results("warmup", {"warmup.before_kd": after})
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
    plot = curves_function({"vanilla": "vanilla.js", "warmup": "warmup.js"}, "js")
    history = {"history": [{"step": 1, "kd": 0.5}, {"step": 2, "kd": 0.4}]}
    figure = plot(
        _results("vanilla", {}, {"vanilla.js": history}), _results("warmup", {}, {"warmup.js": history})
    )
    assert isinstance(figure, Figure)
    assert [line.get_label() for line in figure.get_axes()[0].get_lines()] == ["vanilla", "warmup"]
    assert figure.get_suptitle().startswith("js")
