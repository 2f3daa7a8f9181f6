"""Typed parameters of the `warmup` pipeline (`params:warmup`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from warmup_distill_kedro.core.models.encoding import PromptOverflowParameter
from warmup_distill_kedro.core.training.config import TrainingConfig
from warmup_distill_kedro.core.warmup.preference import PreferenceLossConfig


class WarmupParams(BaseModel):
    """Train the student on the corrected set (chosen = corrected, rejected = its own original)."""

    model_config = ConfigDict(extra="forbid")

    loss: PreferenceLossConfig = PreferenceLossConfig()
    training: TrainingConfig
    max_length: int = Field(192, gt=8, description="prompt + response tokens; longer responses are cut")
    prompt_overflow: PromptOverflowParameter = "error"
    validation_examples: int = Field(256, gt=0, description="gold validation examples for the NLL guard")
