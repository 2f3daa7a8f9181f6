"""Users' own data: JSON Lines or Parquet in GSM8K or Dolly format, read into the common task table.

- GSM8K (`format="gsm8k"`, task `math`): `question`, `answer`. The answer text must end its reasoning with
  `#### N`; the whole text is the `response`, N (canonical) the checkable `answer`.
- Dolly (`format="dolly"`, task `instruction`): `instruction`, `context` or `input` (optional, default ""),
  `response` or `output`. The `answer` is the response itself.

Other fields (Dolly's `category`, ...) are ignored. Text fields are stripped of surrounding whitespace.
Files: `.jsonl` / `.json` (UTF-8, with or without a byte-order mark; one JSON object per line, blank lines
skipped; a `.json` file holding one JSON array of objects is read too) or `.parquet` / `.pq`. Example ids are `file-<line>` (the 1-based line of
a JSONL file, the record of a JSON array or the row of a Parquet file).

The whole file is checked before anything is returned, so that a bad record stops the run before any
training. Every problem found is reported (the first `MAX_REPORTED_PROBLEMS`), each as
`<file>, line <n>: field '<name>' ...` (`row <n>` for Parquet, `record <n>` for a JSON array).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pandas as pd

from warmup_distill_kedro.core.tasks.answers import extract_final_answer
from warmup_distill_kedro.core.tasks.schema import TASKS, TaskDataError, build_prompt, make_table

FileFormat = Literal["gsm8k", "dolly"]
JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".json")
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet", ".pq")
MAX_REPORTED_PROBLEMS = 20

# format -> [(canonical field, accepted names in order of preference, must be non-empty)]
_FIELDS: dict[str, list[tuple[str, tuple[str, ...], bool]]] = {
    "gsm8k": [("question", ("question",), True), ("answer", ("answer",), True)],
    "dolly": [
        ("instruction", ("instruction",), True),
        ("context", ("context", "input"), False),
        ("response", ("response", "output"), True),
    ],
}
_DEFAULT_TASK = {"gsm8k": "math", "dolly": "instruction"}


class _Problems:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.messages.append(f"{self.path}, {where}: {message}")

    def raise_if_any(self) -> None:
        if not self.messages:
            return
        shown = self.messages[:MAX_REPORTED_PROBLEMS]
        more = len(self.messages) - len(shown)
        if len(self.messages) == 1:
            raise TaskDataError(shown[0])
        tail = f"\n  ... and {more} more" if more else ""
        raise TaskDataError(
            f"{self.path}: {len(self.messages)} problems, the file is not used:\n  "
            + "\n  ".join(shown)
            + tail
        )


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _records(path: Path, problems: _Problems) -> Iterator[tuple[int, str, object]]:
    """(1-based number, where, record) for every record; unreadable lines are reported to `problems`."""
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        try:
            table = pd.read_parquet(path)
        except Exception as error:  # pyarrow raises several types for a corrupt file
            raise TaskDataError(f"{path}: not a readable Parquet file ({error})") from error
        for number, record in enumerate(table.to_dict(orient="records"), start=1):
            yield number, f"row {number}", record
        return
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark, which json.loads refuses.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise TaskDataError(f"{path}: not UTF-8 text ({error})") from error
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise TaskDataError(
                f"{path}, line {error.lineno}: not valid JSON ({error.msg}, column {error.colno})"
            ) from error
        for number, record in enumerate(records, start=1):
            yield number, f"record {number}", record
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.add(f"line {number}", f"not valid JSON ({error.msg}, column {error.colno})")
            continue
        yield number, f"line {number}", record


def _field(
    record: dict, names: tuple[str, ...], required: bool, where: str, problems: _Problems
) -> str | None:
    for name in names:
        if name not in record or _is_missing(record[name]):
            continue
        value = record[name]
        if not isinstance(value, str):
            problems.add(where, f"field {name!r} must be a string, got {type(value).__name__} {value!r:.40}")
            return None
        if required and not value.strip():
            problems.add(where, f"field {name!r} is empty")
            return None
        return value.strip()
    if required:
        spelled = " or ".join(repr(name) for name in names)
        problems.add(where, f"field {spelled} is missing")
        return None
    return ""


def read_task_file(path: str | Path, format: FileFormat, task: str | None = None) -> pd.DataFrame:
    """Read a GSM8K or Dolly file (`.jsonl`, `.json`, `.parquet`) into the common task table.

    `task` overrides the task of every example (default: `math` for GSM8K, `instruction` for Dolly).
    Raises `TaskDataError` naming the file, the line (or row) and the field of every problem found.
    """
    path = Path(path)
    if format not in _FIELDS:
        raise TaskDataError(f"{path}: unknown format {format!r}; valid formats: {', '.join(_FIELDS)}")
    task = task or _DEFAULT_TASK[format]
    if task not in TASKS:
        raise TaskDataError(f"{path}: unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        raise TaskDataError(
            f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; accepted suffixes: "
            f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}"
        )
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")

    problems = _Problems(path)
    rows: list[dict] = []
    for number, where, record in _records(path, problems):
        if not isinstance(record, dict):
            problems.add(where, f"expected a JSON object with fields, got {type(record).__name__}")
            continue
        values = {
            field: _field(record, names, required, where, problems)
            for field, names, required in _FIELDS[format]
        }
        if any(value is None for value in values.values()):
            continue
        if format == "gsm8k":
            instruction, context, response = values["question"], "", values["answer"]
            answer = extract_final_answer(response)
            if answer is None:
                problems.add(
                    where, f"field 'answer' has no final '#### N' (a number after '####'): {response!r:.60}"
                )
                continue
        else:
            instruction, context, response = values["instruction"], values["context"], values["response"]
            answer = response
        rows.append(
            {
                "example_id": f"file-{number}",
                "task": task,
                "instruction": instruction,
                "context": context,
                "response": response,
                "answer": answer,
                "references": [response],
                "prompt": build_prompt(task, instruction, context),
            }
        )
    problems.raise_if_any()
    if not rows:
        raise TaskDataError(f"{path}: the file holds no examples (it is empty or has only blank lines)")
    return make_table(rows)
