"""The `data` pipeline on an in-memory catalog: the generated examples in the common schema, split three
ways with no prompt in two splits."""

from __future__ import annotations

from tests.helpers import run_pipeline
from warmup_distill_kedro.core.tasks.schema import COLUMNS
from warmup_distill_kedro.pipelines.data.params import DataParams
from warmup_distill_kedro.pipelines.data.pipeline import create_pipeline

PARAMS = DataParams.model_validate(
    {
        "math": {"n_examples": 30, "seed": 0, "max_number": 9},
        "instruction": {"n_examples": 10, "seed": 1},
        "split": {"validation_fraction": 0.2, "test_fraction": 0.2, "seed": 0},
    }
)


def test_the_examples_and_their_three_splits():
    outputs = run_pipeline(create_pipeline(), {"params:data": PARAMS})
    examples = outputs["examples"]
    assert list(examples.columns) == COLUMNS
    assert examples["task"].value_counts().to_dict() == {"math": 30, "instruction": 10}
    assert examples["example_id"].is_unique

    splits = [outputs[f"{name}_examples"] for name in ("train", "validation", "test")]
    assert sum(len(part) for part in splits) == len(examples)
    assert all(list(part.columns) == COLUMNS and len(part) > 0 for part in splits)
    assert sorted(id_ for part in splits for id_ in part["example_id"]) == sorted(examples["example_id"])
    for i, first in enumerate(splits):
        for second in splits[i + 1 :]:
            assert not set(first["prompt"]) & set(second["prompt"])  # no prompt in two splits
    assert set(splits[0]["task"]) == {"math", "instruction"}
    assert len(splits[0]) > len(splits[1]) and len(splits[0]) > len(splits[2])


def test_the_same_parameters_give_the_same_splits():
    first = run_pipeline(create_pipeline(), {"params:data": PARAMS})
    again = run_pipeline(create_pipeline(), {"params:data": PARAMS})
    for name in ("train_examples", "validation_examples", "test_examples"):
        assert first[name]["example_id"].tolist() == again[name]["example_id"].tolist(), name
