"""Typed parameters of the `check` pipeline (`params:check`)."""

from __future__ import annotations

from pydantic import Field

from warmup_distill_kedro.core.warmup.check import CheckConfig


class CheckParams(CheckConfig):
    """The check rule and the modify strategy (core.warmup.check), plus the histogram's resolution."""

    histogram_bins: int = Field(50, ge=5, le=500)

    @property
    def tau_probability(self) -> float | None:
        """tau, when the rule reads it as a probability (what the histograms mark)."""
        return self.tau if self.rule == "teacher_prob" else None
