"""Typed parameters of the `probe` pipeline (`params:probe`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from warmup_distill_kedro.core.generation.config import SamplingBackend, SamplingConfig


class ProbeParams(BaseModel):
    """How the student samples its own responses to the training prompts."""

    model_config = ConfigDict(extra="forbid")

    n_samples: int = Field(4, gt=0, description="responses per prompt")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int | None = Field(None, gt=0, description="null: off")
    max_new_tokens: int = Field(64, gt=0, description="size it to the task's longest gold response")
    batch_size: int = Field(64, gt=0, description="sequences per generate call")
    seed: int = 0
    skip_prompts: int = Field(
        0, ge=0, description="skip the first N training prompts (those the student was fine-tuned on)"
    )
    max_prompts: int | None = Field(
        None, gt=0, description="probe at most N prompts (after the skipped ones)"
    )
    show_progress: bool = True
    backend: SamplingBackend = Field(
        "transformers", description="transformers | vllm (pip install '.[vllm]', a GPU; docs/sampling.md)"
    )
    vllm_engine_args: dict[str, Any] = Field(
        default_factory=dict, description="backend vllm: more vllm.LLM(...) arguments"
    )

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            seed=self.seed,
            show_progress=self.show_progress,
            backend=self.backend,
            vllm_engine_args=self.vllm_engine_args,
        )
