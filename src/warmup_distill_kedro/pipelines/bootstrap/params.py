"""Typed parameters of the `bootstrap` pipeline (`params:bootstrap.*`); the models' own are
core.training.sft.SFTConfig."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.models.tokenization import TokenizerConfig


class TokenizerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    student: TokenizerConfig
    teacher: TokenizerConfig | None = Field(
        None, description="null: the teacher shares the student's tokenizer; set: the teacher gets its own"
    )


class EvalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_examples: int | None = Field(None, gt=0, description="evaluate on the first N math test examples")
    sampling: SamplingConfig = SamplingConfig()
