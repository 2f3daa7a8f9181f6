"""pipelines/explain/nodes.py, each node called on its own: the teacher explained against itself, one node
function per subject, the summary of several subjects, the check's rejected tokens in the student's tokens."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.helpers import TINY, tiny_checkpoint
from warmup_distill_kedro.grid import Subject
from warmup_distill_kedro.pipelines.explain.nodes import (
    explain_rejected_tokens,
    explain_teacher,
    student_explanation,
)
from warmup_distill_kedro.pipelines.report.nodes import explain_summary_function


def test_the_teacher_is_its_own_reference(teacher, splits, evaluate_params, explain_params):
    records = explain_teacher(teacher, splits[2], explain_params, evaluate_params)
    assert set(records["subject"]) == {"teacher"} and records["example_id"].nunique() == 3
    assert records["kl"].abs().max() < 1e-6 and (records["teacher_entropy"] > 0).all()


def test_a_students_node_explains_its_subject_and_the_summary_compares_it(
    teacher, student, tokenizer, splits, evaluate_params, explain_params
):
    explain = student_explanation(Subject("warmup", "fkl", "warmup.fkl.student"))
    assert explain.__name__ == explain.__qualname__ == "explain_warmup_fkl"
    before = student_explanation(Subject("warmup", "before_kd", "student_warmup"))
    after_records = explain(tiny_checkpoint(tokenizer, TINY, seed=5), teacher, splits[2], explain_params,
                            evaluate_params)  # fmt: skip
    before_records = before(student, teacher, splits[2], explain_params, evaluate_params)
    assert set(after_records["variant"]) == {"warmup"} and set(after_records["objective"]) == {"fkl"}
    assert (after_records["kl"] > 0).all()

    # The report summarises them from the teacher's records and the variant's results.
    summarize = explain_summary_function([("warmup.before_kd", "warmup.fkl")])
    teacher_records = explain_teacher(teacher, splits[2], explain_params, evaluate_params)
    results = {"explain": {"warmup.before_kd": before_records, "warmup.fkl": after_records}}
    table, changed, metrics = summarize(teacher_records, results)
    assert set(table["subject"]) == {"teacher", "warmup.before_kd", "warmup.fkl"}
    change = after_records["nll"].mean() - before_records["nll"].mean()
    assert metrics["warmup.fkl"]["delta_nll"] == pytest.approx(change, rel=1e-5)
    assert set(changed["comparison"]) == {"warmup.fkl"}


def test_the_rejected_tokens_are_classed_in_the_students_tokens(student):
    corrected = pd.DataFrame(
        {"kind": ["pair", "pair"], "rejected": [" 3 + 4 = 8", " 3 + 4 = 7"], "flag_char": [9, 10]}
    )
    rejected = explain_rejected_tokens(corrected, student).set_index("token_class")
    assert rejected.loc["digit", "rejected"] == 1 and rejected.loc["eos", "rejected"] == 1
    assert rejected["rejected"].sum() == 2
