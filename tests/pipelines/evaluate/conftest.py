"""The evaluate stage's parameters: two examples of each task, two sampling seeds, 6 new tokens."""

from __future__ import annotations

import pytest

from warmup_distill_kedro.core.evaluation.evaluate import EvaluateConfig
from warmup_distill_kedro.pipelines.check.params import CheckParams


@pytest.fixture
def evaluate_params() -> EvaluateConfig:
    return EvaluateConfig(
        math_examples=2,
        instruction_examples=2,
        rouge_seeds=[0, 1],
        sampling={"max_new_tokens": 6, "batch_size": 4, "show_progress": False},
        heldout_examples=3,
        check_prompts=2,
        histogram_bins=5,
        batch_size=4,
    )


@pytest.fixture
def check_params() -> CheckParams:
    return CheckParams(tau=0.003, show_progress=False)
