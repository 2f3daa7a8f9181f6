"""Typed parameters of the `distill` pipeline (`params:distill`), shared by every cell of the grid."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from warmup_distill_kedro.core.kd.data import KDDataConfig
from warmup_distill_kedro.core.kd.divergences import OBJECTIVES, validate_options
from warmup_distill_kedro.core.kd.dual_space import DSKDConfig
from warmup_distill_kedro.core.models.encoding import PromptOverflowParameter
from warmup_distill_kedro.core.training.config import TrainingConfig
from warmup_distill_kedro.grid import VARIANTS

# Dual-space KD (arXiv 2406.17328): one tokenizer (dskd) or two, aligned by cross-model attention (dskd_cma).
DUAL_SPACE_OBJECTIVES: tuple[str, ...] = ("dskd", "dskd_cma")
# Plain SFT on the same data, steps and seed, without the teacher: the control KD has to beat.
BASELINE_OBJECTIVES: tuple[str, ...] = ("sft",)
GRID_OBJECTIVES: tuple[str, ...] = (*OBJECTIVES, *DUAL_SPACE_OBJECTIVES, *BASELINE_OBJECTIVES)
# Options of the dual-space objectives beyond their divergence's own.
DUAL_SPACE_OPTIONS: tuple[str, ...] = ("divergence", "projector_lr", "pretrain_steps")


class DistillParams(BaseModel):
    """One budget, one data set and one seed for every (variant, objective) cell: a fair comparison."""

    model_config = ConfigDict(extra="forbid")

    variants: list[str] = Field(["vanilla", "warmup"], min_length=1, description="read by the grid")
    objectives: list[str] = Field(min_length=1, description="read by the grid")
    temperature: float = Field(2.0, gt=0)
    kd_rate: float = Field(0.5, ge=0, le=1, description="loss = (1 - kd_rate) CE + kd_rate KD")
    chunk_size: int | None = Field(
        None,
        gt=0,
        description="positions per chunk of the KD loss at most; null: sized for the device",
    )
    fused_head: bool = Field(
        False,
        description="compute the KD loss from the last hidden states and the LM heads chunk by chunk, never "
        "materializing either model's full logits (core/fused_kd.py); needs chunk_size. Applies to the "
        f"token-level objectives ({', '.join(OBJECTIVES)}); the dskd, dskd_cma and sft cells of the same grid "
        "ignore it; refused when no objective of the grid is token-level. Not with FSDP (sharded heads)",
    )
    options: dict[str, dict[str, Any]] = Field(
        {},
        description="per-objective options, e.g. {js: {beta: 0.5}, dskd: {divergence: fkl, projector_lr: 0.001}}",
    )
    data: KDDataConfig = KDDataConfig()
    sft_examples: int | None = Field(
        1000,
        gt=0,
        description="objective sft: plain SFT on the first N gold training examples (the student's labelled "
        "data); null: every training example",
    )
    training: TrainingConfig
    max_length: int = Field(192, gt=8)
    prompt_overflow: PromptOverflowParameter = "error"
    validation_examples: int = Field(256, gt=0)

    @model_validator(mode="after")
    def _grid_is_known(self) -> DistillParams:
        """Unknown variants, objectives or options stop the run here, before any training."""
        if unknown := sorted(set(self.variants) - set(VARIANTS)):
            raise ValueError(f"variants: unknown {unknown}; choose from {list(VARIANTS)}")
        if unknown := sorted(set(self.objectives) - set(GRID_OBJECTIVES)):
            raise ValueError(f"objectives: unknown {unknown}; choose from {list(GRID_OBJECTIVES)}")
        if self.fused_head and self.chunk_size is None:
            raise ValueError("fused_head: true needs chunk_size (positions per chunk, e.g. 128); it is null")
        if self.fused_head and not set(self.objectives) & set(OBJECTIVES):
            raise ValueError(
                f"fused_head: true applies to the token-level objectives ({', '.join(OBJECTIVES)}), and the "
                f"grid has none ({', '.join(self.objectives)}); set fused_head: false"
            )
        for objective, options in self.options.items():
            if objective not in GRID_OBJECTIVES:
                raise ValueError(
                    f"options: unknown objective {objective!r}; choose from {list(GRID_OBJECTIVES)}"
                )
            if objective in BASELINE_OBJECTIVES and options:
                raise ValueError(f"options.{objective}: plain SFT takes no options, got {sorted(options)}")
            try:
                if objective in DUAL_SPACE_OBJECTIVES:
                    divergence_options = {k: v for k, v in options.items() if k not in DUAL_SPACE_OPTIONS}
                    DSKDConfig(
                        divergence=options.get("divergence", "fkl"),
                        projector_lr=options.get("projector_lr", 1e-3),
                        options=divergence_options,
                    )
                    if int(options.get("pretrain_steps", 0)) < 0:
                        raise ValueError("pretrain_steps must be >= 0")
                else:
                    validate_options(objective, **options)
            except ValueError as error:  # pydantic's ValidationError is a ValueError
                raise ValueError(f"options.{objective}: {error}") from error
        return self
