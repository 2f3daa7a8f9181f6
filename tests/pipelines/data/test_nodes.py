"""pipelines/data/nodes.py: examples from the generated tasks or a user's file; splits hold no order of their
source, so every stage's head sees every task."""

from __future__ import annotations

import json

from warmup_distill_kedro.pipelines.data.nodes import build_examples, split
from warmup_distill_kedro.pipelines.data.params import DataParams


def _params(seed: int = 0) -> DataParams:
    return DataParams.model_validate(
        {
            "math": {"n_examples": 900, "seed": 0},
            "instruction": {"n_examples": 100, "seed": 1},
            "split": {"validation_fraction": 0.1, "test_fraction": 0.1, "seed": seed},
        }
    )


def test_the_head_of_every_split_mixes_the_tasks_the_source_lists_one_after_the_other():
    examples = build_examples(_params())
    assert examples["task"].iloc[0] == "math" and examples["task"].iloc[-1] != "math"  # the source order

    for part in split(examples, _params()):
        head_tasks = set(part["task"].head(len(part) // 3))
        assert "math" in head_tasks and head_tasks - {"math"}, head_tasks


def test_the_split_order_is_seeded():
    examples = build_examples(_params())
    first, again = split(examples, _params()), split(examples, _params())
    other_seed = split(examples, _params(seed=1))
    assert all(
        a["example_id"].tolist() == b["example_id"].tolist() for a, b in zip(first, again, strict=True)
    )
    assert first[0]["example_id"].tolist() != other_seed[0]["example_id"].tolist()


def test_build_examples_reads_a_users_file(tmp_path):
    problems = [
        {"question": f"Tom has {a} apples. How many?", "answer": f"He has {a}.\n#### {a}"} for a in (3, 4, 5)
    ]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    params = DataParams.model_validate(
        {"source": "file", "file": {"path": str(path), "format": "gsm8k"}, "split": {"seed": 0}}
    )
    examples = build_examples(params)
    assert len(examples) == 3 and set(examples["task"]) == {"math"}
    assert examples["answer"].tolist() == ["3", "4", "5"]
    assert all("Tom has" in prompt for prompt in examples["prompt"])
