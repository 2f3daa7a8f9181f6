"""Nodes of the `probe` pipeline: the student samples responses to the training prompts."""

from __future__ import annotations

import pandas as pd

from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.core.warmup import probe as probing
from warmup_distill_kedro.core.warmup.probe import ProbeConfig


def probe(student: Checkpoint, train_examples: pd.DataFrame, params: ProbeConfig) -> pd.DataFrame:
    """`n_samples` student responses per training prompt, one row per sample (core.warmup.probe)."""
    return probing.probe(student, train_examples, params)
