"""core/training/sft.py: what a model built from a config learns (the bootstrap's SFT; the whole run is
tested through the bootstrap pipeline, tests/pipelines/bootstrap)."""

from __future__ import annotations

import pandas as pd
import pytest
from pydantic import ValidationError

from tests.helpers import TINY
from warmup_distill_kedro.core.training.sft import SFTConfig, training_examples

EXAMPLES = pd.DataFrame(
    {
        "prompt": ["p0", "p1", "p2"],
        "response": ["gold0", "gold1", "gold2"],
        "references": [["gold0", "alt0"], ["gold1"], ["gold2", "alt2a", "alt2b"]],
    }
)


def _config(**changes) -> SFTConfig:
    return SFTConfig(model=TINY, training={"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3}, **changes)


def test_the_first_gold_examples():
    assert training_examples(EXAMPLES, _config())["response"].tolist() == ["gold0", "gold1", "gold2"]
    assert training_examples(EXAMPLES, _config(max_train_examples=2))["prompt"].tolist() == ["p0", "p1"]


def test_every_reference_of_the_first_examples():
    rows = training_examples(EXAMPLES, _config(max_train_examples=2, train_on_references=True))
    assert rows["prompt"].tolist() == ["p0", "p0", "p1"]
    assert rows["response"].tolist() == ["gold0", "alt0", "gold1"]
    assert rows.index.tolist() == [0, 1, 2]


def test_the_config_refuses_unknown_and_out_of_range_fields():
    with pytest.raises(ValidationError, match="max_train_examples"):
        _config(max_train_examples=0)
    with pytest.raises(ValidationError, match="label_smoothing"):
        _config(label_smoothing=1.0)
    with pytest.raises(ValidationError, match="max_lenght"):
        _config(max_lenght=64)
