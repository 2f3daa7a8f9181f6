"""Typed parameters of the `evaluate` pipeline (`params:evaluate`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.models.encoding import PromptOverflowParameter


class EvaluateParams(BaseModel):
    """What every model (teacher, students before KD, every distilled student) is measured on.

    Every model sees the same test examples, seeds and budgets, so the numbers compare.
    """

    model_config = ConfigDict(extra="forbid")

    math_examples: int | None = Field(500, gt=0, description="test math problems, greedy; null: all")
    instruction_examples: int | None = Field(100, gt=0, description="test instructions; null: all")
    rouge_seeds: list[int] = Field([0, 1, 2], min_length=1, description="sampling seeds for Rouge-L")
    sampling: SamplingConfig = Field(
        SamplingConfig(max_new_tokens=48, batch_size=128, temperature=1.0, top_p=1.0),
        description="decoding for Rouge-L and the check statistic (math is always greedy)",
    )
    heldout_examples: int = Field(256, gt=0, description="gold test responses for NLL, entropy and KL")
    check_prompts: int = Field(256, ge=0, description="test prompts sampled once for the rejected share")
    histogram_bins: int = Field(20, ge=5, le=200, description="teacher-probability histogram bins")
    batch_size: int = Field(64, gt=0, description="sequences per forward pass for the held-out statistics")
    max_length: int = Field(192, gt=8)
    prompt_overflow: PromptOverflowParameter = "error"
