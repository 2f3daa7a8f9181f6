"""Typed parameters of the `data` pipeline (`params:data`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from warmup_distill_kedro.core.tasks import InstructionTaskConfig, MathTaskConfig, SplitConfig
from warmup_distill_kedro.core.tasks.sources import FileSource


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
