"""Typed parameters of the `distill` pipeline (`params:distill`): the grid's shape, and what every cell
shares (core.kd.cell.DistillConfig)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from warmup_distill_kedro import grid
from warmup_distill_kedro.core.kd.cell import DistillConfig
from warmup_distill_kedro.core.kd.divergences import OBJECTIVES


class DistillParams(DistillConfig):
    """One budget, one data set and one seed for every (variant, objective) cell: a fair comparison."""

    variants: list[str] = Field(list(grid.DEFAULT_VARIANTS), min_length=1, description="read by the grid")
    objectives: list[str] = Field(min_length=1, description="read by the grid")
    seeds: list[int] | None = Field(
        None,
        description="training seeds: every cell is trained once per seed (read by the grid); null: "
        "[training.seed]",
    )

    @field_validator("variants", "objectives", mode="before")
    @classmethod
    def _space_separated(cls, value: Any) -> Any:
        """`--params 'distill.objectives=fkl rkl'` gives one string: its names, as the grid reads them."""
        return grid.spaced_names(value)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_list(cls, value: Any) -> Any:
        return None if value is None else grid.seed_list(value)

    @model_validator(mode="after")
    def _one_place_for_the_seed(self) -> DistillParams:
        """`seeds` or `training.seed`, never both: a seed set in one place and silently ignored in the other
        would be a run that is not what its parameters say."""
        if self.seeds is None:
            self.seeds = [self.training.seed]
        elif "seed" in self.training.model_fields_set:
            raise ValueError(
                f"distill.seeds ({self.seeds}) and distill.training.seed ({self.training.seed}) are both set; "
                "set the training seeds in distill.seeds only (e.g. --params 'distill.seeds=1')"
            )
        return self

    @model_validator(mode="after")
    def _grid_is_known(self) -> DistillParams:
        """An unknown variant or objective stops the run here, before any training."""
        grid.cells(self.model_dump())  # names the parameter and what to choose from
        if self.fused_head and not set(self.objectives) & set(OBJECTIVES):
            raise ValueError(
                f"fused_head: true applies to the token-level objectives ({', '.join(OBJECTIVES)}), and the "
                f"grid has none ({', '.join(self.objectives)}); set fused_head: false"
            )
        return self
