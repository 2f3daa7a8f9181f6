"""Typed parameters of the `bootstrap` pipeline (`params:bootstrap.*`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.models.encoding import PromptOverflowParameter
from warmup_distill_kedro.core.models.modeling import ModelSize
from warmup_distill_kedro.core.models.tokenization import TokenizerConfig
from warmup_distill_kedro.core.training.config import TrainingConfig


class TokenizerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    student: TokenizerConfig
    teacher: TokenizerConfig | None = Field(
        None, description="null: the teacher shares the student's tokenizer; set: the teacher gets its own"
    )


class SFTParams(BaseModel):
    """Build one model from a config and fine-tune it on the gold responses of the training split."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSize
    training: TrainingConfig
    max_length: int = Field(192, gt=8, description="prompt + response tokens; longer responses are cut")
    prompt_overflow: PromptOverflowParameter = "error"
    max_train_examples: int | None = Field(None, gt=0, description="limit the gold data this model sees")
    train_on_references: bool = Field(
        False,
        description="learn every valid reference response, not only the gold one (spreads the model's mass)",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    seed: int = 0


class EvalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_examples: int | None = Field(None, gt=0, description="evaluate on the first N math test examples")
    sampling: SamplingConfig = SamplingConfig()
