"""pipelines/distill/nodes.py: the KD set every cell shares, the baseline's gold examples, and one node
function per grid cell."""

from __future__ import annotations

import pytest

from tests.helpers import SMALL, bpe_tokenizer, tiny_checkpoint
from warmup_distill_kedro.core.tasks import training_texts
from warmup_distill_kedro.grid import Cell
from warmup_distill_kedro.pipelines.distill.nodes import cell_function, kd_examples, sft_examples


def test_the_kd_examples_are_the_selected_training_examples(teacher, splits, distill_params):
    train = splits[0]
    examples = kd_examples(teacher, train, distill_params(["vanilla"], ["fkl"]))
    assert examples["example_id"].tolist() == train["example_id"].iloc[2:10].tolist()  # skip 2, then 8
    assert (examples["gold_response"] == examples["response"]).all()  # off_policy: the gold responses


def test_sequence_kd_puts_the_teachers_responses_in_place_of_the_gold_ones(teacher, splits, distill_params):
    data = {
        "mode": "sequence_kd",
        "max_examples": 3,
        "sampling": {"max_new_tokens": 4, "show_progress": False},
    }
    examples = kd_examples(teacher, splits[0], distill_params(["vanilla"], ["fkl"], data=data))
    assert examples["gold_response"].tolist() == splits[0]["response"].head(3).tolist()
    assert (examples["response"] != examples["gold_response"]).all()
    assert all(
        len(teacher.tokenizer(r, add_special_tokens=False)["input_ids"]) <= 4 for r in examples["response"]
    )


def test_the_sft_baseline_gets_the_students_gold_examples(splits, distill_params):
    examples = sft_examples(splits[0], distill_params(["vanilla"], ["sft"]))
    assert examples["example_id"].tolist() == splits[0]["example_id"].head(6).tolist()


def test_one_node_function_per_cell(teacher, student, splits, distill_params):
    distill = cell_function(Cell("control", "sft"))
    assert distill.__name__ == distill.__qualname__ == "distill_control_sft"
    checkpoint, metrics = distill(
        teacher, student, splits[0].head(6), splits[1], distill_params(["control"], ["sft"])
    )
    assert (metrics["variant"], metrics["objective"]) == ("control", "sft")
    assert (checkpoint.metadata["variant"], checkpoint.metadata["objective"]) == ("control", "sft")
    assert checkpoint.metadata["loss"] is None  # the baseline: no KD loss
    assert metrics["train_sequences"] == 6 and metrics["steps"] == 2


def test_a_token_level_cell_refuses_a_teacher_with_another_tokenizer(student, splits, distill_params):
    other = bpe_tokenizer(training_texts(splits[0]), 280)
    teacher = tiny_checkpoint(other, SMALL, seed=1)
    distill = cell_function(Cell("vanilla", "fkl"))
    with pytest.raises(ValueError, match=r"objective 'fkl' .* tokenizers differ .*\(dskd_cma\)"):
        distill(teacher, student, splits[0].head(4), splits[1], distill_params(["vanilla"], ["fkl"]))
