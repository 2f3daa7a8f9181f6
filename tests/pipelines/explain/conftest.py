"""The explain stage's parameters: the first three of evaluate's held-out gold responses, in batches of 2."""

from __future__ import annotations

import pytest

from warmup_distill_kedro.core.evaluation.evaluate import EvaluateConfig
from warmup_distill_kedro.core.evaluation.explain import ExplainConfig


@pytest.fixture
def evaluate_params() -> EvaluateConfig:
    return EvaluateConfig(heldout_examples=3, batch_size=2)


@pytest.fixture
def explain_params() -> ExplainConfig:
    return ExplainConfig(examples=8)  # capped by evaluate's 3
