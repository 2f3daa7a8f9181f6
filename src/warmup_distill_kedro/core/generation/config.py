"""What generation is asked for and what it returns, shared by both sampling backends (sampling.py, the
transformers path, and vllm_backend.py): `SamplingConfig`, `Generation`, and whether vllm is installed.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from warmup_distill_kedro.core.models.chat import PromptFormatParameter

VLLM_MISSING = (
    "needs the vllm package, which is not installed: pip install '.[vllm]' (on a machine with a GPU), "
    "or set backend: transformers"
)


def vllm_is_installed() -> bool:
    """Whether `import vllm` would find a module (without importing it: that takes seconds)."""
    if "vllm" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def _backend_available(backend: str) -> str:
    if backend == "vllm" and not vllm_is_installed():
        raise ValueError(f"backend 'vllm' {VLLM_MISSING}")
    return backend


# Checked when the parameters are validated, so a missing vllm fails before the first node runs, with
# the parameter's dotted path in the message.
SamplingBackend = Annotated[Literal["transformers", "vllm"], AfterValidator(_backend_available)]


class SamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(64, gt=0)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, gt=0, description="None: off")
    batch_size: int = Field(64, gt=0, description="transformers: sequences per generate call")
    seed: int = 0
    show_progress: bool = True
    prompt_format: PromptFormatParameter = "plain"
    backend: SamplingBackend = Field(
        "transformers",
        description="transformers (the model in memory) | vllm (an engine on the model's checkpoint folder)",
    )
    vllm_engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="backend vllm: more vllm.LLM(...) arguments, e.g. gpu_memory_utilization, max_model_len",
    )


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]  # generated ids, EOS excluded
    logprobs: list[float]  # the model's log-probability of each id in token_ids
    finished: bool  # True when the model emitted EOS, False when cut at max_new_tokens
    eos_logprob: float | None = None  # the model's log-probability of the EOS that ended it, when finished
