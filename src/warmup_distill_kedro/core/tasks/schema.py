"""The one table schema every task source (procedural or file) produces, and the prompt format.

A task table is a pandas DataFrame with exactly the columns in `COLUMNS`:

- `example_id` (str): unique, stable for the same source and parameters (`math-00042`, `file-7`).
- `task`: `"math"` or `"instruction"`.
- `instruction` (str): the question (math) or the instruction (instruction task).
- `context` (str): extra input for the instruction, possibly empty; always empty for math.
- `response` (str): the gold response, non-empty, without an end-of-sequence token.
- `answer` (str): the checkable final answer: for math the number after `####` in canonical form
  ("9", "-3", "2.5"); for the procedural instruction task the bare canonical answer of the template;
  for Dolly files the response itself.
- `references` (list[str]): every valid full response known, the gold response first.
- `prompt` (str): `build_prompt(task, instruction, context)`.

Training concatenates `prompt + RESPONSE_SEPARATOR + response` (then EOS): the response follows the
prompt after exactly one space. `core.models.encoding` tokenizes the prompt and `RESPONSE_SEPARATOR + response`
separately, so generation starts from the prompt's ids and its first generated text is the separator.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from warmup_distill_kedro.core.errors import UserInputError

TASKS: tuple[str, ...] = ("math", "instruction")

COLUMNS: list[str] = [
    "example_id",
    "task",
    "instruction",
    "context",
    "response",
    "answer",
    "references",
    "prompt",
]

# The model's response follows the prompt after exactly one space: `prompt + RESPONSE_SEPARATOR + response`.
RESPONSE_SEPARATOR = " "

_STRING_COLUMNS = ("example_id", "task", "instruction", "context", "response", "answer", "prompt")
_NON_EMPTY_COLUMNS = ("example_id", "instruction", "response", "answer", "prompt")


class TaskDataError(UserInputError):
    """Task data that cannot be used; the message names the origin (file or generator), row and field."""


def build_prompt(task: str, instruction: str, context: str = "") -> str:
    """The prompt text of one example.

    math: `"Question: {instruction}\\nAnswer:"`;
    instruction: `"Instruction: {instruction}\\nContext: {context}\\nResponse:"`, without the Context line
    when the context is empty (or whitespace only).
    """
    if task == "math":
        return f"Question: {instruction}\nAnswer:"
    if task == "instruction":
        if context.strip():
            return f"Instruction: {instruction}\nContext: {context}\nResponse:"
        return f"Instruction: {instruction}\nResponse:"
    raise TaskDataError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


def make_table(rows: Sequence[dict]) -> pd.DataFrame:
    """A table with exactly `COLUMNS`, in order, from row dicts; `prompt` is built where a row lacks it."""
    records = []
    for row in rows:
        record = {column: row[column] for column in COLUMNS if column != "prompt"}
        record["prompt"] = row.get("prompt") or build_prompt(row["task"], row["instruction"], row["context"])
        records.append(record)
    return pd.DataFrame(records, columns=COLUMNS)


def _is_string_list(value: object) -> bool:
    # Parquet round trips turn lists into numpy arrays: accept any non-string sequence of strings.
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return False
    items = list(value)  # type: ignore[call-overload]
    return len(items) > 0 and all(isinstance(item, str) and item.strip() for item in items)


def _where(origin: str, df: pd.DataFrame, position: int) -> str:
    example_id = df["example_id"].iloc[position] if "example_id" in df else None
    suffix = f" ({example_id})" if isinstance(example_id, str) and example_id else ""
    return f"{origin}, row {df.index[position]}{suffix}"


def validate_table(df: pd.DataFrame, origin: str) -> pd.DataFrame:
    """Check that `df` is a usable task table; raise `TaskDataError` naming origin, row and column.

    Checks: every column of `COLUMNS` is present (extra columns are allowed), string columns hold strings,
    `example_id`, `instruction`, `response`, `answer` and `prompt` are not empty, `task` is known,
    `references` is a non-empty list of strings, and no `example_id` occurs twice. Rows are named by
    their index label. Returns `df` unchanged.
    """
    missing = [column for column in COLUMNS if column not in df.columns]
    if missing:
        raise TaskDataError(
            f"{origin}: column {missing[0]!r} is missing (missing: {', '.join(missing)}; "
            f"expected columns: {', '.join(COLUMNS)})"
        )
    for column in _STRING_COLUMNS:
        for position, value in enumerate(df[column].tolist()):
            if not isinstance(value, str):
                raise TaskDataError(
                    f"{_where(origin, df, position)}: column {column!r} is not a string "
                    f"({type(value).__name__})"
                )
            if column in _NON_EMPTY_COLUMNS and not value.strip():
                raise TaskDataError(f"{_where(origin, df, position)}: column {column!r} is empty")
    for position, task in enumerate(df["task"].tolist()):
        if task not in TASKS:
            raise TaskDataError(
                f"{_where(origin, df, position)}: column 'task' is {task!r}, valid tasks: {', '.join(TASKS)}"
            )
    for position, references in enumerate(df["references"].tolist()):
        if not _is_string_list(references):
            raise TaskDataError(
                f"{_where(origin, df, position)}: column 'references' must be a non-empty list of "
                f"non-empty strings, got {str(references)[:80]!r}"
            )
    seen: dict[str, int] = {}
    for position, example_id in enumerate(df["example_id"].tolist()):
        if example_id in seen:
            raise TaskDataError(
                f"{origin}, rows {df.index[seen[example_id]]} and {df.index[position]}: column 'example_id' "
                f"has the duplicate value {example_id!r}"
            )
        seen[example_id] = position
    return df


def training_texts(examples: pd.DataFrame) -> list[str]:
    """Every text a model of this table is trained on, prompt and response joined as in training, plus
    every alternative reference (a tokenizer trained on these learns the variants the teacher will see)."""
    texts = [
        f"{p}{RESPONSE_SEPARATOR}{r}" for p, r in zip(examples["prompt"], examples["response"], strict=True)
    ]
    return texts + [ref for refs in examples["references"] for ref in refs]
