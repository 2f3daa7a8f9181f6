"""Typed parameters of the `distill` pipeline (`params:distill`), shared by every cell of the grid."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from warmup_distill_kedro.core.kd_data import KDDataConfig
from warmup_distill_kedro.core.objectives import OBJECTIVES, validate_options
from warmup_distill_kedro.core.training import TrainingConfig
from warmup_distill_kedro.pipelines.distill.grid import VARIANTS


class DistillParams(BaseModel):
    """One budget, one data set and one seed for every (variant, objective) cell: a fair comparison."""

    model_config = ConfigDict(extra="forbid")

    variants: list[str] = Field(["vanilla", "warmup"], min_length=1, description="read by the grid")
    objectives: list[str] = Field(min_length=1, description="read by the grid")
    temperature: float = Field(2.0, gt=0)
    kd_rate: float = Field(0.5, ge=0, le=1, description="loss = (1 - kd_rate) CE + kd_rate KD")
    chunk_size: int | None = Field(None, gt=0, description="positions per chunk of the KD loss; null: all")
    options: dict[str, dict[str, float | bool]] = Field(
        {}, description="per-objective options, e.g. {js: {beta: 0.5}, skl: {alpha: 0.1}}"
    )
    data: KDDataConfig = KDDataConfig()
    training: TrainingConfig
    max_length: int = Field(192, gt=8)
    validation_examples: int = Field(256, gt=0)

    @model_validator(mode="after")
    def _grid_is_known(self) -> DistillParams:
        """Unknown variants, objectives or options stop the run here, before any training."""
        if unknown := sorted(set(self.variants) - set(VARIANTS)):
            raise ValueError(f"variants: unknown {unknown}; choose from {list(VARIANTS)}")
        if unknown := sorted(set(self.objectives) - set(OBJECTIVES)):
            raise ValueError(f"objectives: unknown {unknown}; choose from {list(OBJECTIVES)}")
        for objective, options in self.options.items():
            if objective not in OBJECTIVES:
                raise ValueError(f"options: unknown objective {objective!r}; choose from {list(OBJECTIVES)}")
            try:
                validate_options(objective, **options)
            except ValueError as error:
                raise ValueError(f"options.{objective}: {error}") from error
        return self
