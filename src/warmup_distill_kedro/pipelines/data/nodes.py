"""Nodes of the `data` pipeline: one table of examples from the configured source, then the splits."""

from __future__ import annotations

import logging

import pandas as pd

from warmup_distill_kedro.core.tasks import (
    generate_instructions,
    generate_math,
    read_task_file,
    split_examples,
)
from warmup_distill_kedro.pipelines.data.params import DataParams

logger = logging.getLogger(__name__)


def build_examples(params: DataParams) -> pd.DataFrame:
    """All examples of the run, before splitting, in the common task schema."""
    if params.source == "file":
        assert params.file is not None
        examples = read_task_file(params.file.path, params.file.format)
        if params.file.test_path is not None:
            test = read_task_file(params.file.test_path, params.file.format)
            test["example_id"] = "test-" + test["example_id"]
            examples = pd.concat([examples.assign(fixed_split=""), test.assign(fixed_split="test")])
        logger.info("read %d examples from %s", len(examples), params.file.path)
        return examples.reset_index(drop=True)
    parts = []
    if params.math is not None:
        parts.append(generate_math(params.math))
    if params.instruction is not None:
        parts.append(generate_instructions(params.instruction))
    examples = pd.concat(parts, ignore_index=True)
    logger.info("generated %s", examples["task"].value_counts().to_dict())
    return examples


def split(examples: pd.DataFrame, params: DataParams) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train / validation / test with no example and no prompt text in two splits, each in seeded order.

    Stages take the head of a split (the student's gold examples, the probe and KD prompts), so a
    split keeps no order of its source: generated tasks come one kind after the other and files are
    often sorted, and either would give every head only the first kind.
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
        config = params.split.model_copy(update={"test_fraction": 0.0})
        table = pd.concat([split_examples(rest, config), fixed_test.assign(split="test")], ignore_index=True)
    else:
        table = split_examples(examples, params.split)
    parts = tuple(
        table[table["split"] == name]
        .drop(columns="split")
        .sample(frac=1.0, random_state=params.split.seed)
        .reset_index(drop=True)
        for name in ("train", "validation", "test")
    )
    logger.info("split sizes: train %d, validation %d, test %d", *(len(p) for p in parts))
    return parts  # type: ignore[return-value]
