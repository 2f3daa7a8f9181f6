import re

import pytest
from pydantic import ValidationError

from warmup_distill_kedro.core.tasks import (
    COLUMNS,
    MathTaskConfig,
    TaskDataError,
    extract_final_answer,
    generate_math,
    math_task,
    validate_table,
)

# An independent reading of a worked answer: "a op b = c." steps, then "#### N".
STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)\.")
RESPONSE = re.compile(r"^(?:\d+ [-+*] \d+ = \d+\. )+#### \d+$")


def _steps(response: str) -> list[tuple[int, str, int, int]]:
    return [(int(a), op, int(b), int(c)) for a, op, b, c in STEP.findall(response)]


def _true(a: int, op: str, b: int, c: int) -> bool:
    return {"+": a + b, "-": a - b, "*": a * b}[op] == c


@pytest.fixture(scope="module")
def table():
    return generate_math(MathTaskConfig(n_examples=600, seed=3, operations=["+", "-", "*"], max_steps=4))


def test_schema_size_and_uniqueness(table):
    assert list(table.columns) == COLUMNS
    assert validate_table(table, "math") is table
    assert len(table) == 600
    assert table["example_id"].is_unique and table["example_id"].iloc[42] == "math-00042"
    assert table["instruction"].is_unique and table["prompt"].is_unique
    assert set(table["task"]) == {"math"} and set(table["context"]) == {""}
    assert all(
        p == f"Question: {q}\nAnswer:" for p, q in zip(table["prompt"], table["instruction"], strict=True)
    )


def test_same_seed_same_table_other_seed_other_table():
    config = MathTaskConfig(n_examples=50, seed=7)
    first = generate_math(config).to_dict("records")
    assert generate_math(config).to_dict("records") == first
    other = generate_math(config.model_copy(update={"seed": 8}))
    assert other["instruction"].tolist() != [row["instruction"] for row in first]


def test_questions_are_short_and_name_quantities(table):
    words = table["instruction"].str.split().str.len()
    assert words.max() <= 45
    assert table["instruction"].str.endswith("?").all()
    assert table["instruction"].str.startswith("How").sum() == 0


def test_every_response_is_well_formed_true_arithmetic_with_the_answer(table):
    config = MathTaskConfig(n_examples=1, operations=["+", "-", "*"], max_steps=4)
    for row in table.itertuples():
        assert RESPONSE.match(row.response), row.response
        assert extract_final_answer(row.response) == row.answer
        steps = _steps(row.response)
        assert config.min_steps <= len(steps) <= 4
        for index, (a, op, b, c) in enumerate(steps):
            assert _true(a, op, b, c), row.response
            assert 0 <= c <= config.result_limit
            assert 0 < c or index == len(steps) - 1  # only the final result may be 0
            if index > 0:
                previous = steps[index - 1][3]
                assert previous in ((a,) if op == "-" else (a, b)), row.response  # results chain
        assert steps[-1][3] == int(row.answer)
        # The starting quantity of the question is the first step's left operand (either side if it commutes).
        start = int(re.search(r"\d+", row.instruction).group())
        a, op, b, _ = steps[0]
        assert start in ((a,) if op == "-" else (a, b)), (row.instruction, row.response)


def test_references_are_valid_reorderings_of_the_gold_steps(table):
    for row in table.itertuples():
        references = list(row.references)
        assert references[0] == row.response
        assert len(references) == len(set(references)) <= 8
        gold = _steps(row.response)
        expected_count = 2 ** sum(op in "+*" and a != b for a, op, b, _ in gold)
        assert len(references) == min(8, expected_count)
        for reference in references:
            assert extract_final_answer(reference) == row.answer
            steps = _steps(reference)
            assert all(_true(*step) for step in steps)
            # Same operations with the same operands, possibly swapped for + and *.
            assert [(op, sorted((a, b)), c) for a, op, b, c in steps] == [
                (op, sorted((a, b)), c) for a, op, b, c in gold
            ]


def test_the_spread_exists_some_gold_responses_swap_operands(table):
    swapped = sum(
        any(
            index > 0 and op in "+*" and a != steps[index - 1][3] for index, (a, op, _, _) in enumerate(steps)
        )
        for steps in map(_steps, table["response"])
    )
    assert 0.1 * len(table) < swapped < 0.9 * len(table)
    assert (table["references"].str.len() > 1).mean() > 0.5


def test_step_order_variation_zero_keeps_the_natural_order():
    table = generate_math(MathTaskConfig(n_examples=200, seed=1, step_order_variation=0.0))
    for response, question in zip(table["response"], table["instruction"], strict=True):
        steps = _steps(response)
        assert steps[0][0] == int(re.search(r"\d+", question).group())
        assert all(steps[i][0] == steps[i - 1][3] for i in range(1, len(steps)))


def test_operations_and_step_counts_follow_the_config():
    table = generate_math(MathTaskConfig(n_examples=200, seed=2, operations=["+"], min_steps=1, max_steps=1))
    assert all(len(_steps(r)) == 1 and " + " in r for r in table["response"])
    table = generate_math(
        MathTaskConfig(n_examples=300, seed=2, operations=["*", "-"], min_steps=3, max_steps=3)
    )
    ops = [op for r in table["response"] for _, op, _, _ in _steps(r)]
    assert set(ops) == {"*", "-"} and all(len(_steps(r)) == 3 for r in table["response"])


def test_max_number_bounds_the_numbers():
    config = MathTaskConfig(n_examples=300, seed=0, max_number=9, max_result=12)
    table = generate_math(config)
    for response in table["response"]:
        for _, op, b, c in _steps(response):
            assert 0 <= c <= 12 and (b <= 9 or op == "+")


def test_too_small_a_space_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(math_task, "_PEOPLE", math_task._PEOPLE[:2])
    monkeypatch.setattr(math_task, "_OBJECTS", math_task._OBJECTS[:1])
    config = MathTaskConfig(n_examples=5000, max_number=2, min_steps=1, max_steps=1, operations=["+"])
    with pytest.raises(TaskDataError, match="n_examples=5000"):
        generate_math(config)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"n_examples": 0}, "n_examples"),
        ({"max_steps": 6}, "max_steps"),
        ({"min_steps": 0}, "min_steps"),
        ({"min_steps": 3, "max_steps": 2}, "min_steps"),
        ({"operations": ["/"]}, "operations"),
        ({"operations": []}, "operations"),
        ({"step_order_variation": 1.5}, "step_order_variation"),
        ({"max_result": 5}, "max_result"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValidationError, match=field):
        MathTaskConfig(**({"n_examples": 10} | changes))
