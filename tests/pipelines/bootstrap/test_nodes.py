"""pipelines/bootstrap/nodes.py, each node called on its own: the tokenizers, a model fine-tuned from its
config, and the math exact match of both models."""

from __future__ import annotations

from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.models.modeling import count_parameters
from warmup_distill_kedro.core.tasks import training_texts
from warmup_distill_kedro.core.training.sft import SFTConfig
from warmup_distill_kedro.pipelines.bootstrap.nodes import build_tokenizers, evaluate_bootstrap, train_student
from warmup_distill_kedro.pipelines.bootstrap.params import EvalParams, TokenizerParams


def test_the_teacher_shares_the_students_tokenizer_unless_it_has_its_own(splits):
    train = splits[0]
    student, teacher = build_tokenizers(train, TokenizerParams(student={"vocab_size": 300}))
    assert teacher is student and len(student) == 300
    student, teacher = build_tokenizers(
        train, TokenizerParams(student={"vocab_size": 300}, teacher={"vocab_size": 280})
    )
    assert (len(student), len(teacher)) == (300, 280)
    text = training_texts(train.head(1))[0]
    assert student.decode(student(text)["input_ids"]) == text == teacher.decode(teacher(text)["input_ids"])


def test_a_student_is_built_from_its_config_and_fine_tuned(tokenizer, splits):
    config = SFTConfig(
        model={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
        training={"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "show_progress": False},
        max_train_examples=8,
    )
    checkpoint, metrics = train_student(tokenizer, splits[0], splits[1], config)
    assert checkpoint.model.config.hidden_size == 16 and checkpoint.tokenizer is tokenizer
    assert (checkpoint.metadata["role"], checkpoint.metadata["stage"]) == ("student", "bootstrap")
    assert metrics["train_sequences"] == 8 and metrics["steps"] == 2
    assert metrics["parameters"] == count_parameters(checkpoint.model)
    assert metrics["final_validation_nll"] < metrics["initial_validation_nll"]


def test_evaluate_bootstrap_measures_both_models_on_the_first_math_problems(teacher, student, splits):
    test = splits[2]
    sampling = SamplingConfig(max_new_tokens=4, batch_size=4, show_progress=False)
    summary = evaluate_bootstrap(teacher, student, test, EvalParams(max_examples=3, sampling=sampling))
    assert set(summary) == {
        "math_test_examples",
        "teacher_math_exact_match",
        "teacher_parameters",
        "student_math_exact_match",
        "student_parameters",
    }
    assert summary["math_test_examples"] == 3 <= (test["task"] == "math").sum()
    assert summary["teacher_parameters"] == count_parameters(teacher.model) > summary["student_parameters"]
    assert summary["student_parameters"] == count_parameters(student.model)
    for role in ("teacher", "student"):
        assert summary[f"{role}_math_exact_match"] in (0.0, 1 / 3, 2 / 3, 1.0)
