"""A corrected set of the warmup stage's tests: (chosen = corrected, rejected = original) pairs of training
prompts."""

from __future__ import annotations

import pandas as pd
import pytest


@pytest.fixture
def corrected_set(splits) -> pd.DataFrame:
    train = splits[0].head(4)
    return pd.DataFrame(
        {
            "prompt_id": train["example_id"],
            "task": train["task"],
            "prompt": train["prompt"],
            "chosen": train["response"],  # the teacher's correction
            "rejected": [f"{response} wrong" for response in train["response"]],  # the student's response
            "chosen_finished": True,
            "rejected_finished": [True, False, True, True],  # one rollout cut at the probe's token budget
            "kind": "pair",
        }
    ).reset_index(drop=True)
