"""pipelines/data/params.py: the data source must be configured, and a user's file must exist."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from warmup_distill_kedro.pipelines.data.params import DataParams


def test_a_file_source_needs_its_file():
    with pytest.raises(
        ValidationError, match=r"data\.source is 'file' but data\.file \(path, format\) is not set"
    ):
        DataParams.model_validate({"source": "file", "split": {}})


def test_a_procedural_source_needs_a_task():
    with pytest.raises(ValidationError, match=r"neither data\.math nor data\.instruction is set"):
        DataParams.model_validate({"split": {}})
    assert DataParams.model_validate({"instruction": {"n_examples": 5}, "split": {}}).math is None


def test_a_missing_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(ValidationError, match=r"data\.file\.path: no such file: .*nowhere\.jsonl"):
        DataParams.model_validate(
            {"source": "file", "file": {"path": str(missing), "format": "gsm8k"}, "split": {}}
        )
