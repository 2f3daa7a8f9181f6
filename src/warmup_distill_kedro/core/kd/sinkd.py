"""SinKD's loss (arXiv 2402.17110): a token-level divergence plus the Sinkhorn distance between the batch's
student and teacher distributions.

    loss = (1 - kd_rate) CE + kd_rate (KD_base + weight * Sinkhorn)

KD_base is one of the token-level objectives (fkl by default, the KL term the official code keeps beside
its Sinkhorn term) with its own options; the Sinkhorn distance is core.kd.sinkhorn's, at the same
temperature, over the batch's response positions. On the student's own samples (data modes on_policy,
adaptive) the CE term is left out, as for every objective.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from warmup_distill_kedro.core.kd.config import KDSettings
from warmup_distill_kedro.core.kd.divergences import OBJECTIVES, unknown_objective, validate_options
from warmup_distill_kedro.core.kd.losses import KDConfig, distillation_loss, response_positions
from warmup_distill_kedro.core.kd.sinkhorn import SINKHORN_DEFAULTS, sinkhorn_loss, validate_sinkhorn_options


class SinKDConfig(KDSettings):
    """The sinkd objective's settings: its base divergence and the Sinkhorn term's weight and options."""

    base: str = Field(
        "fkl", description=f"the token-level divergence beside the Sinkhorn term: {', '.join(OBJECTIVES)}"
    )
    base_options: dict[str, float | bool | str] = Field({}, description="the base divergence's options")
    # 0.0008 in the official LLM code (GPT-Neo/lossd.py), whose marginals are 1: 0.0008 N = 0.2 at N = 256
    weight: float = Field(0.2, ge=0, allow_inf_nan=False, description="the Sinkhorn term's weight")
    epsilon: float = Field(
        SINKHORN_DEFAULTS["epsilon"], description="entropic regularization of the transport"
    )
    iters: int = Field(
        SINKHORN_DEFAULTS["iters"], description="Sinkhorn iterations (row then column scaling)"
    )
    block: int = Field(SINKHORN_DEFAULTS["block"], description="positions per transport problem at most")

    @field_validator("base")
    @classmethod
    def _known_base(cls, value: str) -> str:
        if value not in OBJECTIVES:
            raise ValueError(unknown_objective(value))
        return value

    @model_validator(mode="after")
    def _valid_options(self) -> SinKDConfig:
        self.base_options = validate_options(self.base, **self.base_options)
        validate_sinkhorn_options(**self.sinkhorn_options())
        return self

    @classmethod
    def from_options(cls, settings: KDSettings, options: dict[str, Any]) -> SinKDConfig:
        return cls(**settings.model_dump(), **options)

    def sinkhorn_options(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "iters": self.iters, "block": self.block}

    def base_config(self) -> KDConfig:
        return KDConfig(**self.shared_settings(), objective=self.base, options=self.base_options)


def sinkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    config: SinKDConfig,
    vocab_size: int | None = None,
    ce: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """distillation_loss with the base divergence, plus kd_rate * weight * the Sinkhorn distance over the
    response positions (labels as in distillation_loss). Metrics: distillation_loss's and `sinkhorn`."""
    loss, metrics = distillation_loss(
        student_logits, teacher_logits, labels, config.base_config(), vocab_size, ce
    )
    positions, _ = response_positions(labels, student_logits.device)
    mask = torch.zeros(labels.numel(), dtype=torch.bool, device=student_logits.device)
    mask[positions] = True
    sinkhorn = sinkhorn_loss(
        student_logits,
        teacher_logits,
        mask.view(labels.shape),
        config.temperature,
        vocab_size,
        **config.sinkhorn_options(),
    )
    loss = loss + config.kd_rate * config.weight * sinkhorn
    return loss, {**metrics, "loss": loss.item(), "sinkhorn": sinkhorn.item()}
