"""Warmup-Distill's first step, the probe: the student samples responses to the training prompts, so that
the teacher can check the student's real distribution (check.py).

The log-probability stored with each sampled token is the student's raw one (temperature 1, no top-p),
whatever the sampling settings: it is what the `margin` check rule compares with the teacher's.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from warmup_distill_kedro.core.generation.config import SamplingBackend, SamplingConfig
from warmup_distill_kedro.core.generation.sampling import generate
from warmup_distill_kedro.core.models.chat import PromptFormatParameter, require_chat_template
from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.core.models.tokenization import vocabulary_fingerprint
from warmup_distill_kedro.core.warmup.check import token_char_starts

logger = logging.getLogger(__name__)


class ProbeConfig(BaseModel):
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
    prompt_format: PromptFormatParameter = "plain"
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
            prompt_format=self.prompt_format,
            backend=self.backend,
            vllm_engine_args=self.vllm_engine_args,
        )


ROLLOUT_COLUMNS = (
    "prompt_id", "task", "prompt", "answer", "sample_index", "response", "token_ids", "char_starts",
    "logprobs", "eos_logprob", "finished", "n_tokens", "vocabulary", "prompt_format",
)  # fmt: skip


def probe(student: Checkpoint, train_examples: pd.DataFrame, config: ProbeConfig) -> pd.DataFrame:
    """`n_samples` student responses per training prompt: one row per sample.

    Rows carry the text, the sampled ids with the student's log-probability of each, where each token
    starts in the text (so a teacher with another tokenizer can map its flags back), and whether the
    response ended with EOS or was cut at `max_new_tokens`.

    Under several processes (torch.distributed initialized) every process probes the same prompts:
    each samples a share of the batches and all of them return the whole table (see
    `core.generation.sampling.generate_from_ids`; the samples are those of one process, up to the device's
    floating-point determinism).
    """
    prompts = train_examples.drop_duplicates("prompt").iloc[config.skip_prompts :]
    if config.max_prompts is not None:
        prompts = prompts.head(config.max_prompts)
    if prompts.empty:
        raise ValueError(
            f"probe: no training prompts left to probe ({train_examples['prompt'].nunique()} distinct prompts, "
            f"probe.skip_prompts is {config.skip_prompts})"
        )
    # Sample-major order: the i-th sample of every prompt before the (i+1)-th. (generate sorts prompts by
    # length into batches, so another n_samples gives other batches, and other samples.)
    repeated = pd.concat([prompts.assign(sample_index=i) for i in range(config.n_samples)], ignore_index=True)
    tokenizer = student.tokenizer
    if config.prompt_format == "chat":
        require_chat_template(tokenizer, "probe.prompt_format")
    generations = generate(
        student.model,
        tokenizer,
        repeated["prompt"].tolist(),
        config.sampling(),
        desc="probe",
        across_processes=True,
    )
    rollouts = pd.DataFrame(
        {
            "prompt_id": repeated["example_id"],
            "task": repeated["task"],
            "prompt": repeated["prompt"],
            "answer": repeated["answer"],
            "sample_index": repeated["sample_index"],
            "response": [g.text for g in generations],
            "token_ids": [g.token_ids for g in generations],
            "char_starts": [token_char_starts(tokenizer, g.token_ids) for g in generations],
            "logprobs": [g.logprobs for g in generations],
            "eos_logprob": [g.eos_logprob for g in generations],
            "finished": [g.finished for g in generations],
            "n_tokens": [len(g.token_ids) for g in generations],
            "vocabulary": vocabulary_fingerprint(tokenizer),
            # The check, its corrections and the warmup read the prompts the way the student did.
            "prompt_format": config.prompt_format,
        }
    )
    logger.info(
        "probe: %d rollouts of %d prompts, %.1f%% finished, %.1f tokens on average",
        len(rollouts),
        len(prompts),
        100 * rollouts["finished"].mean(),
        rollouts["n_tokens"].mean(),
    )
    return rollouts.sort_values(["prompt_id", "sample_index"], kind="stable").reset_index(drop=True)
