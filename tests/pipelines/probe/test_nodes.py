"""pipelines/probe/nodes.py: the student samples responses to the training prompts; the error a user meets
before any work is wasted."""

from __future__ import annotations

import pandas as pd
import pytest

from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.core.warmup.probe import ProbeConfig as ProbeParams
from warmup_distill_kedro.pipelines.probe.nodes import probe


def test_probe_says_when_no_prompt_is_left():
    train = pd.DataFrame({"prompt": ["p1", "p2"], "example_id": ["a", "b"], "task": "math", "answer": "1"})
    with pytest.raises(ValueError, match=r"2 distinct prompts, probe\.skip_prompts is 5"):
        probe(Checkpoint(model=None, tokenizer=None, metadata={}), train, ProbeParams(skip_prompts=5))
