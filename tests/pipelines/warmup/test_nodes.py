"""pipelines/warmup/nodes.py on in-memory inputs: the errors a user meets before any work is wasted."""

from __future__ import annotations

import pandas as pd
import pytest

from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.core.warmup.warmup import WarmupConfig as WarmupParams
from warmup_distill_kedro.pipelines.warmup.nodes import control_student, warmup_student


def _warmup_params(loss: str) -> WarmupParams:
    return WarmupParams(
        loss={"loss": loss}, training={"max_steps": 1, "batch_size": 2, "learning_rate": 1e-4}
    )


@pytest.mark.parametrize("loss", ["dpo", "dpo_nll"])
def test_warmup_explains_an_empty_corrected_set(loss):
    corrected = pd.DataFrame(
        {
            "kind": ["sft", "sft"],
            "prompt": ["a", "b"],
            "chosen": ["x", "y"],
            "rejected": [None, None],
            "chosen_finished": [True, True],
            "rejected_finished": [None, None],
        }
    )
    student = Checkpoint(model=None, tokenizer=None, metadata={})  # never reached: the check comes first
    with pytest.raises(ValueError, match=r"no rollout was corrected.*raise check\.tau") as error:
        warmup_student(student, corrected, pd.DataFrame(), _warmup_params(loss))
    assert "2 rows in all" in str(error.value)


def test_the_control_needs_the_corrected_sets_prompts_among_the_training_examples(corrected_set, splits):
    student = Checkpoint(model=None, tokenizer=None, metadata={})  # never reached: the check comes first
    other_run = splits[0].iloc[4:]  # another data run: none of the corrected set's prompt ids
    with pytest.raises(ValueError, match=r"corrected_set prompt_id \[.*\] not found in train_examples"):
        control_student(student, corrected_set, other_run, splits[1], _warmup_params("dpo"))
