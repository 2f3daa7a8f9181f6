"""The `warmup` pipeline on an in-memory catalog: the warmup student trained on the corrected set's pairs,
and its fairness control given the same steps as plain SFT on the same prompts' gold responses."""

from __future__ import annotations

import pytest

from tests.helpers import assert_same_weights, run_pipeline
from warmup_distill_kedro.core.warmup.warmup import WarmupConfig
from warmup_distill_kedro.pipelines.warmup.pipeline import create_pipeline

PARAMS = WarmupConfig(
    loss={"loss": "dpo_nll", "beta": 0.5},
    training={"max_steps": 2, "batch_size": 2, "learning_rate": 1e-2, "log_every": 1, "show_progress": False},
    validation_examples=4,
)


def test_the_warmup_student_and_its_control(student, corrected_set, splits):
    train, validation, _ = splits
    before = {name: tensor.clone() for name, tensor in student.model.state_dict().items()}
    outputs = run_pipeline(
        create_pipeline(),
        {
            "student_model": student,
            "corrected_set": corrected_set,
            "train_examples": train,
            "validation_examples": validation,
            "params:warmup": PARAMS,
        },
    )
    warmup, control = outputs["student_warmup"], outputs["student_control"]
    warmup_metrics, control_metrics = outputs["warmup_metrics"], outputs["control_metrics"]

    assert warmup.metadata["stage"] == "warmup" and control.metadata["stage"] == "warmup_control"
    assert warmup.metadata["steps"] == control.metadata["steps"] == 2  # the same budget
    assert warmup.metadata["warmup_pairs"] == warmup_metrics["pairs"] == len(corrected_set)
    assert control_metrics["rows"] == len(corrected_set)  # one gold row per pair: the same prompts
    for checkpoint in (warmup, control):
        assert checkpoint.metadata["started_from"]["stage"] == "bootstrap"
        assert checkpoint.tokenizer is student.tokenizer
        assert checkpoint.model is not student.model
    for metrics in (warmup_metrics, control_metrics):
        assert metrics["steps"] == 2
        assert [r["step"] for r in metrics["history"] if "loss" in r] == [1, 2]
        assert metrics["history"][0] == {"step": 0, "eval/validation_nll": metrics["initial_validation_nll"]}
    # The same student on the same validation examples before training; trained apart after.
    assert warmup_metrics["initial_validation_nll"] == pytest.approx(
        control_metrics["initial_validation_nll"]
    )
    assert warmup_metrics["final_validation_nll"] != pytest.approx(control_metrics["final_validation_nll"])
    first_step = warmup_metrics["history"][1]
    assert first_step["reward_margin"] == 0.0  # the policy starts as its reference
    assert warmup_metrics["last_loss"] == warmup_metrics["history"][2]["loss"]  # the last training window
    assert "nll" in control_metrics["history"][1] and "reward_margin" not in control_metrics["history"][1]
    assert warmup.metadata["params"] == PARAMS.model_dump(mode="json")

    # Both trained copies; the vanilla student is untouched, and the two differ.
    assert all(student.model.state_dict()[name].equal(tensor) for name, tensor in before.items())
    with pytest.raises(AssertionError):
        assert_same_weights(warmup.model, student.model)
    with pytest.raises(AssertionError):
        assert_same_weights(warmup.model, control.model)


def test_with_the_teacher_as_reference_the_warmup_reads_the_teacher(
    use_grid, teacher, student, corrected_set, splits
):
    """warmup.loss.reference: teacher (DPKD's sequence-level form): the teacher becomes the warmup node's
    input, and the policy starts away from its reference (the margins at step 1 are not 0)."""
    from warmup_distill_kedro import grid

    assert "teacher_model" not in create_pipeline().inputs()  # not loaded for the usual reference
    grid.use_parameters({}, {"loss": {"reference": "teacher"}})
    pipeline = create_pipeline()
    assert "teacher_model" in pipeline.inputs()
    train, validation, _ = splits
    params = PARAMS.model_copy(update={"loss": PARAMS.loss.model_copy(update={"reference": "teacher"})})
    outputs = run_pipeline(
        pipeline.only_nodes("warmup_student"),
        {
            "student_model": student,
            "teacher_model": teacher,
            "corrected_set": corrected_set,
            "validation_examples": validation,
            "params:warmup": params,
        },
    )
    first_step = outputs["warmup_metrics"]["history"][1]
    assert abs(first_step["reward_margin"]) > 1e-4 and abs(first_step["chosen_reward"]) > 1e-4
    assert outputs["student_warmup"].metadata["params"]["loss"]["reference"] == "teacher"
