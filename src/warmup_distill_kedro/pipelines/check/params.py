"""Typed parameters of the `check` pipeline (`params:check`)."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from warmup_distill_kedro.core.warmup.check import CheckConfig


class CheckParams(CheckConfig):
    """The check rule and the modify strategy (see core.checking), plus what to keep and to plot."""

    model_config = ConfigDict(extra="forbid")

    keep_unflagged: bool = Field(
        False, description="keep rollouts the rule did not flag as SFT rows (chosen only) in corrected_set"
    )
    histogram_bins: int = Field(50, ge=5, le=500)
    show_progress: bool = True
