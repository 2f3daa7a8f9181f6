"""Where a run's examples come from, and how they are split: the generated tasks or a user's file, one
table in the common schema, then train / validation / test with no prompt in two splits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from warmup_distill_kedro.core.tasks.files import read_task_file
from warmup_distill_kedro.core.tasks.instruction_task import InstructionTaskConfig, generate_instructions
from warmup_distill_kedro.core.tasks.math_task import MathTaskConfig, generate_math
from warmup_distill_kedro.core.tasks.splits import SplitConfig, split_examples

logger = logging.getLogger(__name__)

SPLIT_ORDER = ("train", "validation", "test")


class FileSource(BaseModel):
    """Users' own data: JSONL or Parquet, in GSM8K or Dolly format."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    format: Literal["gsm8k", "dolly"]
    test_path: Path | None = Field(
        None, description="a separate test file; else the test split comes from `path`"
    )

    @model_validator(mode="after")
    def _files_exist(self) -> FileSource:
        for name in ("path", "test_path"):
            value = getattr(self, name)
            if value is not None and not value.is_file():
                raise ValueError(f"data.file.{name}: no such file: {value}")
        return self


def read_examples(source: FileSource) -> pd.DataFrame:
    """A user's file as one table; with `test_path`, its rows marked for the test split (`fixed_split`)."""
    examples = read_task_file(source.path, source.format)
    if source.test_path is not None:
        test = read_task_file(source.test_path, source.format)
        test["example_id"] = "test-" + test["example_id"]
        examples = pd.concat([examples.assign(fixed_split=""), test.assign(fixed_split="test")])
    logger.info("read %d examples from %s", len(examples), source.path)
    return examples.reset_index(drop=True)


def generate_examples(math: MathTaskConfig | None, instruction: InstructionTaskConfig | None) -> pd.DataFrame:
    """The embedded tasks, generated from their seeds."""
    parts = []
    if math is not None:
        parts.append(generate_math(math))
    if instruction is not None:
        parts.append(generate_instructions(instruction))
    examples = pd.concat(parts, ignore_index=True)
    logger.info("generated %s", examples["task"].value_counts().to_dict())
    return examples


def three_splits(
    examples: pd.DataFrame, config: SplitConfig
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train / validation / test with no example and no prompt text in two splits, each in seeded order.

    Stages take the head of a split (the student's gold examples, the probe and KD prompts), so a
    split keeps no order of its source: generated tasks come one kind after the other and files are
    often sorted, and either would give every head only the first kind. Rows a file marked for the test
    split (`fixed_split`) go there, and nowhere else.
    """
    if "fixed_split" in examples:
        fixed_test = examples[examples["fixed_split"] == "test"].drop(columns="fixed_split")
        rest = examples[examples["fixed_split"] != "test"].drop(columns="fixed_split")
        overlap = set(fixed_test["prompt"]) & set(rest["prompt"])
        if overlap:
            raise ValueError(
                f"data.file.test_path shares {len(overlap)} prompts with data.file.path, "
                f"e.g. {next(iter(overlap))[:80]!r}"
            )
        table = pd.concat(
            [
                split_examples(rest, config.model_copy(update={"test_fraction": 0.0})),
                fixed_test.assign(split="test"),
            ],
            ignore_index=True,
        )
    else:
        table = split_examples(examples, config)
    parts = tuple(
        table[table["split"] == name]
        .drop(columns="split")
        .sample(frac=1.0, random_state=config.seed)
        .reset_index(drop=True)
        for name in SPLIT_ORDER
    )
    logger.info("split sizes: train %d, validation %d, test %d", *(len(p) for p in parts))
    return parts  # type: ignore[return-value]
