"""The `evaluate` pipeline on an in-memory catalog, built for a one-cell grid: the teacher, the student
before KD and the cell's student measured on the same test examples, seeds and budgets."""

from __future__ import annotations

import pytest

from tests.helpers import TINY, run_pipeline, tiny_checkpoint
from warmup_distill_kedro.pipelines.evaluate.pipeline import create_pipeline

SUBJECTS = ("teacher", "vanilla.before_kd", "vanilla.fkl")


def test_every_subject_of_a_one_cell_grid(
    use_grid, teacher, student, tokenizer, splits, evaluate_params, check_params
):
    use_grid(["vanilla"], ["fkl"])
    pipeline = create_pipeline()
    # Each node's own name says whose it is (kedro-viz shows it alone, inside the namespace's box).
    assert {n.name for n in pipeline.nodes} == {
        "teacher.evaluate_teacher",
        "vanilla.before_kd.evaluate_vanilla_before_kd",
        "vanilla.fkl.evaluate_vanilla_fkl",
    }
    distilled = tiny_checkpoint(tokenizer, TINY, seed=3)
    test = splits[2]
    outputs = run_pipeline(
        pipeline,
        {
            "teacher_model": teacher,
            "student_model": student,
            "vanilla.fkl.student": distilled,
            "test_examples": test,
            "params:evaluate": evaluate_params,
            "params:check": check_params,
        },
    )
    evaluations = {s: outputs[f"{s}.evaluation_metrics"] for s in SUBJECTS}
    assert [(e["subject"], e["variant"], e["objective"]) for e in evaluations.values()] == [
        ("teacher", "teacher", "teacher"),
        ("vanilla.before_kd", "vanilla", "before_kd"),
        ("vanilla.fkl", "vanilla", "fkl"),
    ]
    for subject, evaluation in evaluations.items():
        predictions = outputs[f"{subject}.predictions"]
        assert evaluation["math"]["n_examples"] == 2 and evaluation["instruction"]["n_seeds"] == 2
        assert predictions["task"].value_counts().to_dict() == {"math": 2, "instruction": 4}, subject
        math_predictions = predictions[predictions["task"] == "math"]
        assert (
            math_predictions["example_id"].tolist()
            == test[test["task"] == "math"]["example_id"].head(2).tolist()
        )
        assert evaluation["distribution"]["n_sampled_tokens"] > 0
    assert evaluations["teacher"]["distribution"]["heldout_kl"] is None  # no KL to itself
    student_kl = [evaluations[s]["distribution"]["heldout_kl"] for s in SUBJECTS[1:]]
    assert all(kl > 0 for kl in student_kl) and student_kl[0] != pytest.approx(student_kl[1])  # two students
    # The same test examples for every subject.
    ids = [set(outputs[f"{s}.predictions"]["example_id"]) for s in SUBJECTS]
    assert ids[0] == ids[1] == ids[2]


def test_the_control_student_is_measured_whenever_warmup_is_in_the_grid(use_grid):
    use_grid(["warmup"], ["fkl"])
    pipeline = create_pipeline()
    assert {n.namespace for n in pipeline.nodes} == {
        "teacher",
        "warmup.before_kd",
        "control.before_kd",
        "warmup.fkl",
    }
    assert pipeline.inputs() == {
        "teacher_model",
        "student_warmup",
        "student_control",
        "warmup.fkl.student",
        "test_examples",
        "params:evaluate",
        "params:check",
    }
    assert "control.before_kd.evaluation_metrics" in pipeline.outputs()
