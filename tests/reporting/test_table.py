"""reporting/table.py: the long table from evaluation records: seed statistics, averages, differences
between variants, missing cells, order, and the errors of bad records."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from tests.helpers import REPORT_OBJECTIVES as OBJECTIVES
from tests.helpers import REPORT_VARIANTS as VARIANTS
from tests.helpers import evaluation, markdown_rows, row
from warmup_distill_kedro.reporting.markdown import render_markdown
from warmup_distill_kedro.reporting.records import RECORD_COLUMNS, evaluation_records
from warmup_distill_kedro.reporting.table import TABLE_COLUMNS, build_table


def test_seed_statistics_match_hand_computed_values(table):
    assert list(table.columns) == list(TABLE_COLUMNS)
    warm = row(table, "fkl", "warmup", "instruction", "rouge_l")
    assert warm["mean"] == pytest.approx(0.52)
    assert warm["std"] == pytest.approx(0.02)  # ddof=1 over 0.50, 0.52, 0.54
    assert warm["n_seeds"] == 3 and warm["status"] == "ok"
    single = row(table, "fkl", "warmup", "math", "exact_match")
    assert (single["mean"], single["std"], single["n_seeds"]) == (pytest.approx(0.44), 0.0, 1)


def test_average_of_benchmarks_with_different_seeds_combines_means(table):
    # math (greedy) and instruction (sampling seeds 0-2) share no seed: mean of means, stds combined.
    vanilla = row(table, "fkl", "vanilla", "average", "score")
    assert vanilla["mean"] == pytest.approx((0.40 + 0.51) / 2)
    assert vanilla["std"] == pytest.approx(math.sqrt(0.0**2 + 0.01**2) / 2)
    assert vanilla["n_seeds"] == 1


def test_average_over_shared_seeds_is_taken_per_seed():
    records = pd.DataFrame(
        [
            ("vanilla.fkl", "vanilla", "fkl", "math", "exact_match", "0", 0.40),
            ("vanilla.fkl", "vanilla", "fkl", "math", "exact_match", "1", 0.42),
            ("vanilla.fkl", "vanilla", "fkl", "instruction", "rouge_l", "0", 0.50),
            ("vanilla.fkl", "vanilla", "fkl", "instruction", "rouge_l", "1", 0.46),
        ],
        columns=list(RECORD_COLUMNS),
    )
    table = build_table(records, ["vanilla"], ["fkl"])
    average = row(table, "fkl", "vanilla", "average", "score")
    # per seed: (0.40 + 0.50) / 2 = 0.45 and (0.42 + 0.46) / 2 = 0.44
    assert average["mean"] == pytest.approx(0.445)
    assert average["std"] == pytest.approx(math.sqrt(((0.45 - 0.445) ** 2 + (0.44 - 0.445) ** 2) / 1))
    assert average["n_seeds"] == 2


def test_average_is_math_when_only_math_was_measured(evaluations):
    only_math = {name: {**ev, "instruction": None} for name, ev in evaluations.items()}
    table = build_table(evaluation_records(only_math), VARIANTS, OBJECTIVES)
    average = row(table, "fkl", "warmup", "average", "score")
    assert average["mean"] == pytest.approx(0.44)
    assert "instruction" not in set(table["benchmark"])


def test_a_cell_lacking_a_benchmark_others_have_gets_no_average(evaluations):
    evaluations["vanilla.rkl"]["instruction"] = None
    table = build_table(evaluation_records(evaluations), VARIANTS, OBJECTIVES)
    average = row(table, "rkl", "vanilla", "average", "score")
    assert average["status"] == "incomplete" and math.isnan(average["mean"])
    assert "No average for vanilla/rkl" in render_markdown(table)


def test_warmup_minus_vanilla_delta(table):
    delta = row(table, "fkl", "warmup-vanilla", "instruction", "rouge_l")
    assert delta["mean"] == pytest.approx(0.01)
    assert delta["std"] == pytest.approx(math.sqrt(0.02**2 + 0.01**2))
    assert delta["n_seeds"] == 3 and delta["status"] == "ok"
    before = row(table, "before_kd", "warmup-vanilla", "math", "exact_match")
    assert before["mean"] == pytest.approx(-0.02)
    assert not (table["objective"].eq("teacher") & table["variant"].eq("warmup-vanilla")).any()


def test_expected_cells_without_records_are_missing_rows(table):
    measured = table[(table["status"] == "ok") & ~table["variant"].str.contains("-")]
    pairs = set(zip(measured["benchmark"], measured["metric"], strict=True))
    assert len(pairs) == 7  # math, instruction, average, 4 distribution statistics
    for objective, variant in [("rkl", "warmup"), ("akl", "vanilla"), ("akl", "warmup")]:
        cell = table[(table["objective"] == objective) & (table["variant"] == variant)]
        assert set(zip(cell["benchmark"], cell["metric"], strict=True)) == pairs
        assert (
            (cell["status"] == "missing").all() and (cell["n_seeds"] == 0).all() and cell["mean"].isna().all()
        )
    delta = row(table, "rkl", "warmup-vanilla", "math", "exact_match")
    assert delta["status"] == "missing" and math.isnan(delta["mean"])


def test_reference_rows_are_expected_too(evaluations):
    del evaluations["teacher"], evaluations["warmup_student"]
    table = build_table(evaluation_records(evaluations), VARIANTS, ["fkl"])
    assert row(table, "teacher", "teacher", "math", "exact_match")["status"] == "missing"
    assert row(table, "before_kd", "warmup", "average", "score")["status"] == "missing"
    assert row(table, "before_kd", "warmup-vanilla", "math", "exact_match")["status"] == "missing"
    markdown = render_markdown(table)
    assert markdown_rows(markdown, "teacher")[0][1:4] == ["missing", "", ""]
    assert "Missing cells (no evaluation found): teacher, warmup/before_kd" in markdown


def test_rows_are_ordered_by_objective_then_variant(table):
    assert list(dict.fromkeys(table["objective"])) == ["teacher", "before_kd", "fkl", "rkl", "akl"]
    fkl = table[table["objective"] == "fkl"]
    assert list(dict.fromkeys(fkl["variant"])) == ["vanilla", "warmup", "warmup-vanilla"]
    assert list(dict.fromkeys(fkl["benchmark"])) == ["math", "instruction", "average", "distribution"]


def test_control_variant_adds_a_warmup_minus_control_delta(evaluations):
    evaluations["control.fkl"] = evaluation("control.fkl", "control", "fkl", 0.39, (0.49, 0.50, 0.51))
    table = build_table(evaluation_records(evaluations), ["vanilla", "warmup", "control"], ["fkl"])
    delta = row(table, "fkl", "warmup-control", "math", "exact_match")
    assert delta["mean"] == pytest.approx(0.44 - 0.39)
    # control has no before_kd student in this data: its reference row is missing, so is the delta
    assert row(table, "before_kd", "control", "math", "exact_match")["status"] == "missing"
    assert row(table, "before_kd", "warmup-control", "math", "exact_match")["status"] == "missing"


def test_bad_records_name_the_problem(evaluations):
    records = evaluation_records(evaluations)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['seed'\]"):
        build_table(records.drop(columns="seed"), VARIANTS, OBJECTIVES)
    repeated = records[(records["subject"] == "vanilla.fkl") & (records["benchmark"] == "math")]
    with pytest.raises(ValueError, match=r"vanilla/fkl math.exact_match has seed 'greedy' more than once"):
        build_table(pd.concat([records, repeated]), VARIANTS, OBJECTIVES)
    with pytest.raises(ValueError, match=r"objectives must be a sequence of names"):
        build_table(records, VARIANTS, "fkl,rkl")
    with pytest.raises(ValueError, match=r"no evaluation records"):
        build_table(records.iloc[0:0], VARIANTS, OBJECTIVES)


def test_a_control_student_outside_the_grid_is_a_reference_row_only(evaluations):
    """The control student evaluated before KD, with no control cells in the grid: its column and the
    warmup-control difference exist where it was measured, and nothing is reported missing elsewhere."""
    evaluations["control_student"] = evaluation(
        "control_student", "control", "before_kd", 0.31, (0.40, 0.41, 0.42)
    )
    table = build_table(evaluation_records(evaluations), VARIANTS, OBJECTIVES)
    delta = row(table, "before_kd", "warmup-control", "math", "exact_match")
    assert delta["mean"] == pytest.approx(0.28 - 0.31) and delta["status"] == "ok"
    assert table[(table["objective"] == "fkl") & table["variant"].isin(["control", "warmup-control"])].empty
    assert "warmup/akl" in render_markdown(table)  # the grid's own missing cell is still reported


def test_the_flexible_math_score_is_a_percent_row_outside_the_average(evaluations):
    for name, score in (("vanilla.fkl", 0.55), ("warmup.fkl", 0.6)):
        evaluations[name]["math"]["flexible_match"] = score
    table = build_table(evaluation_records(evaluations), VARIANTS, OBJECTIVES)
    assert row(table, "fkl", "vanilla", "math", "flexible_match")["mean"] == pytest.approx(0.55)
    assert row(table, "fkl", "warmup-vanilla", "math", "flexible_match")["mean"] == pytest.approx(0.05)
    strict_rows = table[(table["benchmark"] == "math") & (table["objective"] == "fkl")]
    assert strict_rows["metric"].tolist()[:2] == ["exact_match", "flexible_match"]
    # The headline average stays the strict score's: (0.40 + 0.51) / 2, as without the flexible one.
    assert row(table, "fkl", "vanilla", "average", "score")["mean"] == pytest.approx((0.40 + 0.51) / 2)
