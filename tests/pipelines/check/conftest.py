"""The student's rollouts the check stage's tests score."""

from __future__ import annotations

import pytest

from warmup_distill_kedro.core.warmup.probe import ProbeConfig, probe


@pytest.fixture
def rollouts(student, splits):
    """Two samples of four training prompts, up to 8 tokens each."""
    config = ProbeConfig(n_samples=2, max_new_tokens=8, batch_size=8, max_prompts=4, show_progress=False)
    return probe(student, splits[0], config)
