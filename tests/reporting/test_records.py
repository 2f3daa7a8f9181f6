from __future__ import annotations

import math

import pytest

from tests.helpers import evaluation
from warmup_distill_kedro.reporting.records import RECORD_COLUMNS, evaluation_records


def test_records_have_one_row_per_measured_number():
    evaluations = {
        "teacher": evaluation("teacher", "teacher", "teacher", exact_match=0.9, rouge=(0.6, 0.7), kl=None),
        "vanilla.fkl": evaluation("vanilla.fkl", "vanilla", "fkl", exact_match=0.43, rejected=None),
    }
    records = evaluation_records(evaluations)

    assert list(records.columns) == list(RECORD_COLUMNS)
    teacher = records[records["subject"] == "teacher"]
    # math 1 + instruction 2 seeds + distribution nll, entropy, rejected_share (kl is null) = 6
    assert len(teacher) == 6
    assert set(teacher["metric"]) == {
        "exact_match",
        "rouge_l",
        "heldout_nll",
        "heldout_entropy",
        "rejected_share",
    }
    cell = records[records["subject"] == "vanilla.fkl"].set_index(["benchmark", "metric", "seed"])["value"]
    assert cell[("math", "exact_match", "greedy")] == 0.43
    assert cell[("instruction", "rouge_l", "1")] == 0.51
    assert cell[("distribution", "heldout_kl", "-")] == 0.1
    assert ("distribution", "rejected_share", "-") not in cell.index  # null = not measured, no record
    assert set(records.loc[records["subject"] == "vanilla.fkl", "variant"]) == {"vanilla"}
    assert records["seed"].map(type).eq(str).all()


def test_null_benchmarks_produce_no_records():
    records = evaluation_records({"s": evaluation("student", "vanilla", "before_kd", rouge=None)})
    assert "instruction" not in set(records["benchmark"])
    assert set(records["benchmark"]) == {"math", "distribution"}


@pytest.mark.parametrize("field", ["subject", "variant", "objective"])
def test_missing_identity_field_names_the_entry_and_field(field):
    broken = evaluation("warmup.fkl", "warmup", "fkl")
    del broken[field]
    with pytest.raises(ValueError, match=rf"evaluation 'cell_7'.*field '{field}'"):
        evaluation_records({"cell_7": broken})


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("math", "exact_match"), "0.4", "math.exact_match"),
        (("math", "exact_match"), True, "math.exact_match"),
        (("math", "exact_match"), math.nan, "math.exact_match"),
        (("instruction", "rouge_l_per_seed", "2"), None, "instruction.rouge_l_per_seed.2"),
        (("distribution", "heldout_kl"), [0.1], "distribution.heldout_kl"),
    ],
)
def test_value_that_is_not_a_number_names_the_field(path, value, field):
    broken = evaluation("vanilla.rkl", "vanilla", "rkl")
    target = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValueError, match=rf"evaluation 'vanilla.rkl': field '{field}' must be a number"):
        evaluation_records({"vanilla.rkl": broken})


def test_instruction_without_per_seed_scores_is_an_error():
    broken = evaluation("vanilla.js", "vanilla", "js")
    broken["instruction"]["rouge_l_per_seed"] = {}
    with pytest.raises(ValueError, match=r"'vanilla.js'.*'instruction.rouge_l_per_seed'"):
        evaluation_records({"vanilla.js": broken})


def test_a_benchmark_that_is_not_a_dict_is_an_error():
    broken = evaluation("vanilla.js", "vanilla", "js")
    broken["math"] = 0.4
    with pytest.raises(ValueError, match=r"'vanilla.js': field 'math' must be a dict or null"):
        evaluation_records({"vanilla.js": broken})


def test_two_entries_with_the_same_subject_are_refused():
    twice = {
        "a": evaluation("vanilla.fkl", "vanilla", "fkl"),
        "b": evaluation("vanilla.fkl", "vanilla", "fkl"),
    }
    with pytest.raises(ValueError, match=r"evaluation 'b': subject 'vanilla.fkl' is also the subject of 'a'"):
        evaluation_records(twice)


def test_a_run_of_a_seeded_cell_is_one_record_per_metric_under_its_training_seed():
    seeded = {
        **evaluation("vanilla.fkl.seed2", "vanilla", "fkl", 0.4, (0.50, 0.52, 0.54)),
        "training_seed": 2,
    }
    records = evaluation_records({"vanilla.fkl.seed2": seeded}).set_index(["benchmark", "metric"])
    assert set(records["seed"]) == {"2"}
    assert records.loc[("instruction", "rouge_l"), "value"] == pytest.approx(0.52)  # sampling seeds' mean
    assert records.loc[("math", "exact_match"), "value"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="'training_seed' must be an integer"):
        evaluation_records({"x": {**seeded, "training_seed": "2"}})


def test_the_flexible_math_score_is_a_record_beside_the_strict_one():
    measured = evaluation("vanilla.fkl", "vanilla", "fkl", exact_match=0.2)
    measured["math"]["flexible_match"] = 0.35
    records = evaluation_records({"a": measured, "older": evaluation("teacher", "teacher", "teacher")})
    math_records = records[records["benchmark"] == "math"].set_index(["subject", "metric"])["value"]
    assert math_records[("vanilla.fkl", "exact_match")] == 0.2
    assert math_records[("vanilla.fkl", "flexible_match")] == 0.35
    assert ("teacher", "flexible_match") not in math_records.index  # an evaluation without it: no record
