"""The `bootstrap` pipeline on an in-memory catalog: a tokenizer trained on the training split, a teacher
and a student built from their configs and fine-tuned for two steps, and both measured on math."""

from __future__ import annotations

from tests.helpers import run_pipeline
from warmup_distill_kedro.core.models.modeling import count_parameters
from warmup_distill_kedro.core.training.sft import SFTConfig
from warmup_distill_kedro.pipelines.bootstrap.params import EvalParams, TokenizerParams
from warmup_distill_kedro.pipelines.bootstrap.pipeline import create_pipeline

TRAINING = {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "log_every": 1, "show_progress": False}


def _model(hidden_size: int) -> dict:
    return {
        "hidden_size": hidden_size,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    }


def test_tokenizers_teacher_student_and_their_gap(splits):
    train, validation, test = splits
    outputs = run_pipeline(
        create_pipeline(),
        {
            "train_examples": train,
            "validation_examples": validation,
            "test_examples": test,
            "params:bootstrap.tokenizers": TokenizerParams(student={"vocab_size": 300}),
            "params:bootstrap.teacher": SFTConfig(
                model=_model(32), training=TRAINING, train_on_references=True
            ),
            "params:bootstrap.student": SFTConfig(model=_model(16), training=TRAINING, max_train_examples=10),
            "params:bootstrap.eval": EvalParams(
                max_examples=3, sampling={"max_new_tokens": 4, "show_progress": False}
            ),
        },
    )
    tokenizer = outputs["student_tokenizer"]
    assert outputs["teacher_tokenizer"] is tokenizer and len(tokenizer) == 300

    teacher, student = outputs["teacher_model"], outputs["student_model"]
    assert teacher.model.config.hidden_size == 32 and student.model.config.hidden_size == 16
    assert teacher.tokenizer is tokenizer and student.tokenizer is tokenizer
    assert teacher.model.config.vocab_size == len(tokenizer)
    assert (teacher.metadata["role"], student.metadata["role"]) == ("teacher", "student")
    assert teacher.metadata["steps"] == student.metadata["steps"] == 2

    teacher_metrics, student_metrics = outputs["teacher_sft_metrics"], outputs["student_sft_metrics"]
    references = sum(len(refs) for refs in train["references"])
    assert teacher_metrics["train_sequences"] == references > len(train)  # every reference of every example
    assert student_metrics["train_sequences"] == 10  # its gold examples only
    for metrics in (teacher_metrics, student_metrics):
        assert [record["step"] for record in metrics["history"] if "loss" in record] == [1, 2]
        assert metrics["initial_validation_nll"] > metrics["final_validation_nll"]

    summary = outputs["bootstrap_summary"]
    assert summary["math_test_examples"] == 3
    assert summary["teacher_parameters"] == count_parameters(teacher.model)
    assert summary["student_parameters"] == count_parameters(student.model) < summary["teacher_parameters"]
    assert (
        0.0 <= summary["teacher_math_exact_match"] <= 1.0
        and 0.0 <= summary["student_math_exact_match"] <= 1.0
    )
