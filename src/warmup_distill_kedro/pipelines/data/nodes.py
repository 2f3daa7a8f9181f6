"""Nodes of the `data` pipeline: one table of examples from the configured source, then the splits."""

from __future__ import annotations

import pandas as pd

from warmup_distill_kedro.core.tasks.sources import generate_examples, read_examples, three_splits
from warmup_distill_kedro.pipelines.data.params import DataParams


def build_examples(params: DataParams) -> pd.DataFrame:
    """All examples of the run, before splitting, in the common task schema."""
    if params.source == "file":
        assert params.file is not None  # DataParams checks it
        return read_examples(params.file)
    return generate_examples(params.math, params.instruction)


def split(examples: pd.DataFrame, params: DataParams) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train / validation / test, no prompt in two of them, each in seeded order."""
    return three_splits(examples, params.split)
