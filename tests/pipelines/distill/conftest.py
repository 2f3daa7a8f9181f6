"""The distill parameters of the stage's tests: two optimizer steps on a handful of gold examples."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from warmup_distill_kedro.pipelines.distill.params import DistillParams


def _distill_params(variants: list[str], objectives: list[str], **changes) -> DistillParams:
    values = {
        "variants": variants,
        "objectives": objectives,
        "data": {"mode": "off_policy", "skip_examples": 2, "max_examples": 8},
        "sft_examples": 6,
        "training": {
            "max_steps": 2,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "log_every": 1,
            "show_progress": False,
        },
        "validation_examples": 4,
    }
    return DistillParams(**{**values, **changes})


@pytest.fixture
def distill_params() -> Callable[..., DistillParams]:
    """`distill_params(variants, objectives, **changes)`: KD on examples 3 to 10 of the training split (gold
    responses), the sft baseline on the first 6, 2 steps of batch 4, 4 validation examples."""
    return _distill_params
