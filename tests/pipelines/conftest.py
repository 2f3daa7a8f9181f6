"""What the stages' tests share: the splits of a tiny data run, a tokenizer trained on them, and an untrained
teacher and student (a fresh pair per test: some nodes switch the teacher to eval mode)."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.helpers import SMALL, TINY, bpe_tokenizer, tiny_checkpoint, tiny_splits
from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.core.tasks import training_texts


@pytest.fixture(scope="session")
def splits() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train / validation / test: 48 / 16 / 16 examples of both tasks."""
    return tiny_splits()


@pytest.fixture(scope="session")
def tokenizer(splits):
    return bpe_tokenizer(training_texts(pd.concat(splits)))


@pytest.fixture
def teacher(tokenizer) -> Checkpoint:
    return tiny_checkpoint(tokenizer, SMALL, seed=1, metadata={"role": "teacher", "stage": "bootstrap"})


@pytest.fixture
def student(tokenizer) -> Checkpoint:
    return tiny_checkpoint(tokenizer, TINY, seed=2, metadata={"role": "student", "stage": "bootstrap"})
