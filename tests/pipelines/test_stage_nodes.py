"""Stage nodes on in-memory inputs: the errors a user meets before any work is wasted."""

from __future__ import annotations

import pandas as pd
import pytest

from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.core.warmup.probe import ProbeConfig as ProbeParams
from warmup_distill_kedro.core.warmup.warmup import WarmupConfig as WarmupParams
from warmup_distill_kedro.pipelines.probe.nodes import probe
from warmup_distill_kedro.pipelines.warmup.nodes import warmup_student


def _warmup_params(loss: str) -> WarmupParams:
    return WarmupParams(
        loss={"loss": loss}, training={"max_steps": 1, "batch_size": 2, "learning_rate": 1e-4}
    )


@pytest.mark.parametrize("loss", ["dpo", "dpo_nll"])
def test_warmup_explains_an_empty_corrected_set(loss):
    corrected = pd.DataFrame(
        {"kind": ["sft", "sft"], "prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": [None, None]}
    )
    student = Checkpoint(model=None, tokenizer=None, metadata={})  # never reached: the check comes first
    with pytest.raises(ValueError, match=r"no rollout was corrected.*raise check\.tau") as error:
        warmup_student(student, corrected, pd.DataFrame(), _warmup_params(loss))
    assert "2 rows in all" in str(error.value)


def test_probe_says_when_no_prompt_is_left():
    train = pd.DataFrame({"prompt": ["p1", "p2"], "example_id": ["a", "b"], "task": "math", "answer": "1"})
    with pytest.raises(ValueError, match=r"2 distinct prompts, probe\.skip_prompts is 5"):
        probe(Checkpoint(model=None, tokenizer=None, metadata={}), train, ProbeParams(skip_prompts=5))
