import pandas as pd
import pytest

from warmup_distill_kedro.core.tasks import (
    COLUMNS,
    RESPONSE_SEPARATOR,
    TaskDataError,
    build_prompt,
    validate_table,
)


def _table(n: int = 3) -> pd.DataFrame:
    rows = []
    for i in range(n):
        question = f"Tom has {i + 2} apples. He buys 1 more. How many apples does Tom have now?"
        response = f"{i + 2} + 1 = {i + 3}. #### {i + 3}"
        rows.append(
            {
                "example_id": f"math-{i:05d}",
                "task": "math",
                "instruction": question,
                "context": "",
                "response": response,
                "answer": str(i + 3),
                "references": [response],
                "prompt": build_prompt("math", question),
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def test_prompt_formats():
    assert build_prompt("math", "What is 2 + 2?") == "Question: What is 2 + 2?\nAnswer:"
    assert build_prompt("instruction", "Sort.", "3, 1") == "Instruction: Sort.\nContext: 3, 1\nResponse:"
    assert build_prompt("instruction", "Say hi.", "") == "Instruction: Say hi.\nResponse:"
    assert build_prompt("instruction", "Say hi.", "  ") == "Instruction: Say hi.\nResponse:"
    assert RESPONSE_SEPARATOR == " "
    with pytest.raises(TaskDataError, match="poetry"):
        build_prompt("poetry", "x")


def test_validate_table_accepts_a_good_table_and_extra_columns():
    table = _table().assign(split="train")
    assert validate_table(table, "origin") is table


def test_validate_table_names_a_missing_column():
    with pytest.raises(TaskDataError, match=r"my-origin: column 'references' is missing"):
        validate_table(_table().drop(columns="references"), "my-origin")


def test_validate_table_names_row_and_column_of_an_empty_response():
    table = _table()
    table.loc[1, "response"] = "   "
    with pytest.raises(TaskDataError) as error:
        validate_table(table, "my-origin")
    assert "my-origin, row 1 (math-00001): column 'response' is empty" in str(error.value)


def test_validate_table_names_duplicate_ids():
    table = _table()
    table.loc[2, "example_id"] = "math-00000"
    with pytest.raises(TaskDataError) as error:
        validate_table(table, "gen")
    message = str(error.value)
    assert "gen, rows 0 and 2" in message and "'example_id'" in message and "math-00000" in message


def test_validate_table_rejects_unknown_task_and_empty_references():
    table = _table()
    table.loc[0, "task"] = "poetry"
    with pytest.raises(TaskDataError, match=r"row 0 .*column 'task'"):
        validate_table(table, "gen")
    table = _table()
    table.at[2, "references"] = []
    with pytest.raises(TaskDataError, match=r"row 2 .*column 'references'"):
        validate_table(table, "gen")
