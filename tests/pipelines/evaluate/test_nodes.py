"""pipelines/evaluate/nodes.py, each node called on its own: the teacher measured like the students (no KL to
itself, its own judge), and one node function per subject."""

from __future__ import annotations

import pytest

from warmup_distill_kedro.grid import Subject
from warmup_distill_kedro.pipelines.evaluate.nodes import evaluate_teacher, student_evaluation


def test_the_teacher_is_measured_like_a_student(teacher, splits, evaluate_params, check_params):
    test = splits[2]
    metrics, predictions = evaluate_teacher(teacher, test, evaluate_params, check_params)
    assert (metrics["subject"], metrics["variant"], metrics["objective"]) == ("teacher", "teacher", "teacher")
    assert metrics["math"]["n_examples"] == 2 and 0.0 <= metrics["math"]["exact_match"] <= 1.0
    assert metrics["instruction"]["n_examples"] == 2 and metrics["instruction"]["n_seeds"] == 2
    assert sorted(metrics["instruction"]["rouge_l_per_seed"]) == ["0", "1"]
    distribution = metrics["distribution"]
    assert distribution["heldout_kl"] is None and distribution["teacher_heldout_entropy"] is None
    assert distribution["heldout_nll"] > 0 and distribution["n_sampled_tokens"] > 0
    histogram = distribution["teacher_prob_histogram"]
    assert len(histogram["edges"]) == 6 and sum(histogram["counts"]) == distribution["n_sampled_tokens"]
    assert predictions["task"].value_counts().to_dict() == {"math": 2, "instruction": 2 * 2}  # 2 seeds


def test_a_students_node_measures_its_subject_against_the_teacher(
    teacher, student, splits, evaluate_params, check_params
):
    evaluate = student_evaluation(Subject("warmup", "before_kd", "student_warmup"))
    assert evaluate.__name__ == evaluate.__qualname__ == "evaluate_warmup_before_kd"
    metrics, predictions = evaluate(student, teacher, splits[2], evaluate_params, check_params)
    assert (metrics["subject"], metrics["variant"], metrics["objective"]) == (
        "warmup.before_kd",
        "warmup",
        "before_kd",
    )
    assert metrics["distribution"]["heldout_kl"] > 0  # one vocabulary: KL(teacher || student)
    assert metrics["distribution"]["teacher_heldout_entropy"] > 0
    assert set(predictions["task"]) == {"math", "instruction"}


def test_no_test_example_is_refused(teacher, splits, evaluate_params, check_params):
    with pytest.raises(ValueError, match="test_examples has no rows to evaluate"):
        evaluate_teacher(teacher, splits[2].head(0), evaluate_params, check_params)
