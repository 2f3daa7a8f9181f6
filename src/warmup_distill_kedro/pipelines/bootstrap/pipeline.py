from kedro.pipeline import Pipeline, node

from warmup_distill_kedro.pipelines.bootstrap.nodes import (
    build_tokenizers,
    evaluate_bootstrap,
    train_student,
    train_teacher,
)

_SPLITS = ["train_examples", "validation_examples"]


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                build_tokenizers,
                ["train_examples", "params:bootstrap.tokenizers"],
                ["student_tokenizer", "teacher_tokenizer"],
                name="build_tokenizers",
            ),
            node(
                train_teacher,
                ["teacher_tokenizer", *_SPLITS, "params:bootstrap.teacher"],
                ["teacher_model", "teacher_sft_metrics"],
                name="sft_teacher",
                tags=["training"],
            ),
            node(
                train_student,
                ["student_tokenizer", *_SPLITS, "params:bootstrap.student"],
                ["student_model", "student_sft_metrics"],
                name="sft_student",
                tags=["training"],
            ),
            node(
                evaluate_bootstrap,
                ["teacher_model", "student_model", "test_examples", "params:bootstrap.eval"],
                "bootstrap_summary",
                name="evaluate_bootstrap",
            ),
        ],
        tags=["bootstrap"],
    )
