"""The `distill` pipeline on an in-memory catalog, built for a one-cell grid: the shared KD set, then the
cell's node in its namespace, reading its variant's starting student and writing `<variant>.<objective>.*`."""

from __future__ import annotations

import pytest

from tests.helpers import run_pipeline
from warmup_distill_kedro.pipelines.distill.pipeline import create_pipeline


def test_one_token_level_cell(use_grid, distill_params, teacher, student, splits):
    use_grid(["vanilla"], ["fkl"])
    pipeline = create_pipeline()
    assert {n.name for n in pipeline.nodes} == {"prepare_kd_examples", "vanilla.fkl.distill_vanilla_fkl"}
    train, validation, _ = splits
    params = distill_params(["vanilla"], ["fkl"])
    outputs = run_pipeline(
        pipeline,
        {
            "teacher_model": teacher,
            "student_model": student,
            "train_examples": train,
            "validation_examples": validation,
            "params:distill": params,
        },
    )
    assert outputs["kd_examples"]["example_id"].tolist() == train["example_id"].iloc[2:10].tolist()
    distilled, metrics = outputs["vanilla.fkl.student"], outputs["vanilla.fkl.distill_metrics"]
    assert distilled.metadata["stage"] == "distill" and distilled.metadata["steps"] == 2
    assert (distilled.metadata["variant"], distilled.metadata["objective"]) == ("vanilla", "fkl")
    assert distilled.metadata["loss"]["objective"] == "fkl"
    assert distilled.metadata["loss"]["temperature"] == params.temperature
    assert distilled.model is not student.model and distilled.tokenizer is student.tokenizer
    assert (metrics["variant"], metrics["objective"], metrics["data_mode"]) == (
        "vanilla",
        "fkl",
        "off_policy",
    )
    assert metrics["train_sequences"] == 8 and metrics["steps"] == 2
    training = [record for record in metrics["history"] if "loss" in record]
    assert [record["step"] for record in training] == [1, 2]
    assert all({"ce", "kd", "tokens"} <= set(record) for record in training)
    assert metrics["initial_validation_kl"] > 0 and metrics["final_validation_kl"] > 0
    assert metrics["initial_validation_nll"] != pytest.approx(metrics["final_validation_nll"])  # it trained


def test_the_sft_baseline_cell_of_the_control_student(use_grid, distill_params, teacher, student, splits):
    """The baseline reads the student's gold examples (not the KD set), starting from student_control."""
    use_grid(["control"], ["sft"])
    pipeline = create_pipeline()
    assert {n.name for n in pipeline.nodes} == {
        "prepare_kd_examples",
        "prepare_sft_examples",
        "control.sft.distill_control_sft",
    }
    assert pipeline.inputs() == {
        "teacher_model",
        "student_control",
        "train_examples",
        "validation_examples",
        "params:distill",
    }
    train, validation, _ = splits
    outputs = run_pipeline(
        pipeline,
        {
            "teacher_model": teacher,
            "student_control": student,
            "train_examples": train,
            "validation_examples": validation,
            "params:distill": distill_params(["control"], ["sft"]),
        },
    )
    assert outputs["sft_examples"]["example_id"].tolist() == train["example_id"].head(6).tolist()
    distilled, metrics = outputs["control.sft.student"], outputs["control.sft.distill_metrics"]
    assert distilled.metadata["loss"] is None  # no teacher in the loss
    assert (distilled.metadata["variant"], distilled.metadata["objective"]) == ("control", "sft")
    assert metrics["train_sequences"] == 6
    assert "final_validation_kl" in metrics  # measured against the teacher all the same (the KD curves)
