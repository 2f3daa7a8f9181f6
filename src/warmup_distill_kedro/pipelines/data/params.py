"""Typed parameters of the `data` pipeline (`params:data`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from warmup_distill_kedro.core.tasks import InstructionTaskConfig, MathTaskConfig, SplitConfig


class FileSource(BaseModel):
    """Users' own data: JSONL or Parquet, in GSM8K or Dolly format."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    format: Literal["gsm8k", "dolly"]
    test_path: Path | None = Field(
        None, description="a separate test file; else the test split comes from `path`"
    )

    @model_validator(mode="after")
    def _files_exist(self) -> FileSource:
        for name in ("path", "test_path"):
            value = getattr(self, name)
            if value is not None and not value.is_file():
                raise ValueError(f"data.file.{name}: no such file: {value}")
        return self


class DataParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Literal["procedural", "file"] = "procedural"
    math: MathTaskConfig | None = None
    instruction: InstructionTaskConfig | None = None
    file: FileSource | None = None
    split: SplitConfig

    @model_validator(mode="after")
    def _source_is_configured(self) -> DataParams:
        if self.source == "file" and self.file is None:
            raise ValueError("data.source is 'file' but data.file (path, format) is not set")
        if self.source == "procedural" and self.math is None and self.instruction is None:
            raise ValueError("data.source is 'procedural' but neither data.math nor data.instruction is set")
        return self
