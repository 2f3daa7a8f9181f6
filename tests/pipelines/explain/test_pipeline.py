"""The `explain` pipeline on an in-memory catalog: every subject of a one-cell grid explained on the same
gold tokens, the means and the change after KD; with warmup in the grid, the students before KD compared
and the check's rejected tokens read."""

from __future__ import annotations

import pytest

from tests.helpers import TINY, run_pipeline, tiny_checkpoint
from warmup_distill_kedro import grid
from warmup_distill_kedro.core.evaluation.likelihood import heldout_distribution
from warmup_distill_kedro.core.models.encoding import encode_examples
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids
from warmup_distill_kedro.pipelines.explain.pipeline import comparisons, create_pipeline
from warmup_distill_kedro.pipelines.report.nodes import explain_summary_function

SUBJECTS = ("teacher", "vanilla.before_kd", "vanilla.fkl")


def test_every_subject_of_a_one_cell_grid(
    use_grid, teacher, student, tokenizer, splits, evaluate_params, explain_params
):
    use_grid(["vanilla"], ["fkl"])
    pipeline = create_pipeline()
    explain_nodes = {f"{s}.{grid.node_name('explain', s)}" for s in SUBJECTS}  # explain_vanilla_fkl, ...
    assert {n.name for n in pipeline.nodes} == explain_nodes  # the report pipeline summarises them
    assert pipeline.inputs() == {
        "teacher_model", "student_model", "vanilla.fkl.student", "test_examples", "params:explain",
        "params:evaluate",
    }  # fmt: skip
    test = splits[2]
    outputs = run_pipeline(
        pipeline,
        {
            "teacher_model": teacher,
            "student_model": student,
            "vanilla.fkl.student": tiny_checkpoint(tokenizer, TINY, seed=3),
            "test_examples": test,
            "params:explain": explain_params,
            "params:evaluate": evaluate_params,
        },
    )
    records = {s: outputs[f"{s}.explain_tokens"] for s in SUBJECTS}
    # The same gold tokens for every model: the first 3 test responses (evaluate's), EOS included.
    gold, _ = encode_examples(tokenizer, test.head(3), evaluate_params.max_length)
    expected_ids = [t for example in gold for t in example.labels if t != -100]
    for subject, frame in records.items():
        assert frame["token_id"].tolist() == expected_ids, subject
        assert (frame["subject"] == subject).all()
        assert frame["example_id"].unique().tolist() == test["example_id"].head(3).tolist()
    assert records["teacher"]["kl"].abs().max() < 1e-6
    # Their mean over every token is the evaluate stage's held-out KL of the same student.
    _, pad_id = eos_and_pad_ids(tokenizer)
    held_out = heldout_distribution(student.model, teacher.model, gold, pad_id, 2, len(tokenizer))
    assert records["vanilla.before_kd"]["kl"].mean() == pytest.approx(held_out["heldout_kl"], rel=1e-5)

    summarize = explain_summary_function(comparisons(grid.cells()))
    results = {"explain": {s: records[s] for s in SUBJECTS if s != "teacher"}}
    table, changed, metrics = summarize(records["teacher"], results)
    assert set(table["subject"]) == set(SUBJECTS)
    assert set(changed["comparison"]) == {"vanilla.fkl"}
    overall = changed[(changed["task"] == "all") & (changed["by"] == "class") & (changed["group"] == "all")]
    after, before = (records[s]["kl"].mean() for s in ("vanilla.fkl", "vanilla.before_kd"))
    assert overall["delta_kl"].iloc[0] == pytest.approx(after - before, rel=1e-6)
    assert metrics["vanilla.fkl"]["delta_kl"] == pytest.approx(after - before, rel=1e-6)
    assert set(records["vanilla.fkl"]["task"]) == set(changed["task"]) - {"all"}


def test_with_warmup_the_students_before_kd_are_compared_and_the_rejected_tokens_read(use_grid):
    use_grid(["vanilla", "warmup"], ["fkl"])
    pipeline = create_pipeline()
    assert "explain_rejected_tokens" in {n.name for n in pipeline.nodes}
    assert {"corrected_set", "student_model", "student_warmup", "student_control"} <= pipeline.inputs()
    assert "explain_rejected" in pipeline.outputs()
    assert comparisons(grid.cells()) == [
        ("vanilla.before_kd", "vanilla.fkl"),
        ("warmup.before_kd", "warmup.fkl"),
        ("vanilla.before_kd", "warmup.before_kd"),
        ("vanilla.before_kd", "control.before_kd"),
    ]


def test_without_vanilla_there_is_no_warmup_comparison(use_grid):
    use_grid(["warmup"], ["fkl", "js"])
    pipeline = create_pipeline()
    assert "explain_rejected_tokens" not in {n.name for n in pipeline.nodes}
    assert "corrected_set" not in pipeline.inputs()
    assert comparisons(grid.cells()) == [
        ("warmup.before_kd", "warmup.fkl"),
        ("warmup.before_kd", "warmup.js"),
    ]
