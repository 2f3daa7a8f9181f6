"""The training loop's settings: budgets in optimizer steps, never seconds."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainingConfig(BaseModel):
    """Budget and optimisation settings; budgets are optimizer steps, never seconds."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(gt=0, description="optimizer steps")
    batch_size: int = Field(gt=0, description="examples per forward pass and process")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a share of the peak rate")
    max_grad_norm: float | None = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="0: evaluate only at the end")
    seed: int = 0
    checkpoint_every: int = Field(
        100, ge=0, description="save the resumable state every N steps when a state folder is set; 0: never"
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gradient_checkpointing: bool = Field(
        False,
        description="recompute activations in the backward pass (non-reentrant): less memory, more compute",
    )
    show_progress: bool = True
