"""core/training/config.py: the training settings refuse what cannot run, naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from warmup_distill_kedro.core.training.config import TrainingConfig


def test_config_validation():
    with pytest.raises(ValidationError, match="max_steps"):
        TrainingConfig(max_steps=0, batch_size=4, learning_rate=1e-3)
    with pytest.raises(ValidationError, match="learning_rate"):
        TrainingConfig(max_steps=1, batch_size=4, learning_rate=0.0)
    with pytest.raises(ValidationError, match="max_step"):
        TrainingConfig(max_step=1, batch_size=4, learning_rate=1e-3)
