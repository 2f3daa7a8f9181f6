import json

import pandas as pd
import pytest

from warmup_distill_kedro.core.tasks import COLUMNS, TaskDataError, read_task_file, validate_table

GSM8K = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {
        "question": "A shop sells 1,000 pens a day. How many in 2 days?",
        "answer": "1000 * 2 = 2000\n#### 2,000",
    },
]
DOLLY = [
    {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"},
    {"instruction": "Summarise.", "input": "Cats sleep a lot.", "output": "Cats sleep much."},
]


def _write_jsonl(path, records, raw_lines=()):
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _error(path, fmt):
    with pytest.raises(TaskDataError) as error:
        read_task_file(path, fmt)
    return str(error.value)


def test_gsm8k_jsonl(tmp_path):
    table = read_task_file(_write_jsonl(tmp_path / "train.jsonl", GSM8K), "gsm8k")
    assert list(table.columns) == COLUMNS and validate_table(table, "file") is table
    assert table["example_id"].tolist() == ["file-1", "file-2"]
    assert table["task"].tolist() == ["math", "math"]
    assert table["answer"].tolist() == ["7", "2000"]
    assert table["response"].iloc[1] == "1000 * 2 = 2000\n#### 2,000"
    assert table["references"].iloc[0] == [table["response"].iloc[0]]
    assert table["prompt"].iloc[0] == "Question: Tom has 3 apples and buys 4. How many?\nAnswer:"


def test_dolly_jsonl_with_input_output_aliases_and_blank_lines(tmp_path):
    path = tmp_path / "dolly.json"
    records = DOLLY[:2]
    path.write_text(json.dumps(records[0]) + "\n\n   \n" + json.dumps(records[1]) + "\n", encoding="utf-8")
    table = read_task_file(path, "dolly")
    assert table["example_id"].tolist() == ["file-1", "file-4"]  # physical line numbers
    assert table["task"].tolist() == ["instruction", "instruction"]
    assert table["context"].tolist() == ["", "Cats sleep a lot."]
    assert table["response"].tolist() == ["Blue.", "Cats sleep much."]
    assert table["answer"].tolist() == table["response"].tolist()
    assert table["prompt"].iloc[0] == "Instruction: Name a colour.\nResponse:"
    assert table["prompt"].iloc[1] == "Instruction: Summarise.\nContext: Cats sleep a lot.\nResponse:"


def test_json_array_file(tmp_path):
    path = tmp_path / "dolly.json"
    path.write_text(json.dumps(DOLLY[:2], indent=2), encoding="utf-8")
    table = read_task_file(path, "dolly")
    assert table["response"].tolist() == ["Blue.", "Cats sleep much."]


def test_parquet_in_both_formats(tmp_path):
    pd.DataFrame(GSM8K).to_parquet(tmp_path / "g.parquet")
    table = read_task_file(tmp_path / "g.parquet", "gsm8k")
    assert table["answer"].tolist() == ["7", "2000"] and table["example_id"].tolist() == ["file-1", "file-2"]
    pd.DataFrame([{"instruction": "Sum up.", "input": None, "output": "Done."}]).to_parquet(
        tmp_path / "d.parquet"
    )
    table = read_task_file(tmp_path / "d.parquet", "dolly")
    assert table[["context", "response", "answer"]].iloc[0].tolist() == ["", "Done.", "Done."]


def test_task_override(tmp_path):
    table = read_task_file(_write_jsonl(tmp_path / "d.jsonl", DOLLY[:1]), "dolly", task="math")
    assert table["task"].tolist() == ["math"] and table["prompt"].iloc[0].startswith("Question: ")
    with pytest.raises(TaskDataError, match="poetry"):
        read_task_file(tmp_path / "d.jsonl", "dolly", task="poetry")


GOOD_GSM8K = json.dumps(GSM8K[0])
GOOD_DOLLY = json.dumps(DOLLY[0])


@pytest.mark.parametrize(
    ("fmt", "bad_line", "expected"),
    [
        ("gsm8k", '{"question": "q", "answer": ', "not valid JSON"),
        ("gsm8k", "[1, 2]", "expected a JSON object"),
        ("gsm8k", '"just a string"', "expected a JSON object"),
        ("gsm8k", '{"question": "q"}', "field 'answer' is missing"),
        ("gsm8k", '{"answer": "#### 3"}', "field 'question' is missing"),
        ("gsm8k", '{"question": 5, "answer": "#### 3"}', "field 'question' must be a string"),
        ("gsm8k", '{"question": "   ", "answer": "#### 3"}', "field 'question' is empty"),
        ("gsm8k", '{"question": "q", "answer": ""}', "field 'answer' is empty"),
        ("gsm8k", '{"question": "q", "answer": "3 + 4 = 7"}', "field 'answer' has no final '#### N'"),
        ("gsm8k", '{"question": "q", "answer": "#### seven"}', "field 'answer' has no final '#### N'"),
        ("dolly", '{"instruction": "i"}', "field 'response' or 'output' is missing"),
        ("dolly", '{"instruction": "", "response": "r"}', "field 'instruction' is empty"),
        ("dolly", '{"instruction": "i", "response": " \\n "}', "field 'response' is empty"),
        ("dolly", '{"instruction": "i", "output": ["r"]}', "field 'output' must be a string"),
        ("dolly", '{"instruction": "i", "context": 3, "response": "r"}', "field 'context' must be a string"),
        ("dolly", '{"response": "r"}', "field 'instruction' is missing"),
    ],
)
def test_malformed_jsonl_lines_are_reported_with_file_line_and_field(tmp_path, fmt, bad_line, expected):
    good = GOOD_GSM8K if fmt == "gsm8k" else GOOD_DOLLY
    path = tmp_path / "train.jsonl"
    path.write_text(f"{good}\n\n{good}\n{bad_line}\n{good}\n", encoding="utf-8")
    message = _error(path, fmt)
    assert f"{path}, line 4: " in message, message
    assert expected in message, message


def test_every_problem_of_a_file_is_reported_at_once(tmp_path):
    path = _write_jsonl(
        tmp_path / "train.jsonl", [GSM8K[0], {"question": "q"}, GSM8K[1], {"answer": "#### 1"}]
    )
    message = _error(path, "gsm8k")
    assert "2 problems" in message
    assert f"{path}, line 2: field 'answer' is missing" in message
    assert f"{path}, line 4: field 'question' is missing" in message


def test_malformed_parquet_rows_name_the_row_and_field(tmp_path):
    path = tmp_path / "data.parquet"
    pd.DataFrame({"question": ["q1", "q2", "  "], "answer": ["#### 1", "no marker", "#### 3"]}).to_parquet(
        path
    )
    message = _error(path, "gsm8k")
    assert f"{path}, row 2: field 'answer' has no final '#### N'" in message
    assert f"{path}, row 3: field 'question' is empty" in message
    pd.DataFrame({"question": ["q1"]}).to_parquet(path)
    assert f"{path}, row 1: field 'answer' is missing" in _error(path, "gsm8k")


def test_empty_file_wrong_suffix_and_missing_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    assert str(empty) in _error(empty, "dolly") and "no examples" in _error(empty, "dolly")
    csv = tmp_path / "train.csv"
    csv.write_text("question,answer\n", encoding="utf-8")
    message = _error(csv, "gsm8k")
    assert str(csv) in message and ".jsonl" in message and ".parquet" in message
    assert "no such file" in _error(tmp_path / "missing.jsonl", "gsm8k")


def test_a_file_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Spreadsheet exports often start with a UTF-8 BOM, which json.loads refuses at line 1."""
    path = tmp_path / "train.jsonl"
    line = json.dumps({"question": "Tom has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"})
    path.write_bytes(b"\xef\xbb\xbf" + (line + "\n").encode())
    table = read_task_file(path, "gsm8k")
    assert table["instruction"].tolist() == ["Tom has 2 apples and buys 3. How many?"]
    assert table["answer"].tolist() == ["5"]
