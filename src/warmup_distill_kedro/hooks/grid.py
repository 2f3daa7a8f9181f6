"""Hands the run's `distill` parameters to the grid (grid.py) before Kedro builds any pipeline."""

from __future__ import annotations

from typing import Any

from kedro.framework.hooks import hook_impl

from warmup_distill_kedro import grid


class GridParametersHook:
    """Reads the `distill` block (and the warmup's DPO reference) of the run being set up (CLI `--params` included) when the context is
    created, which Kedro does before it asks the registry for pipelines."""

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        parameters = context.config_loader["parameters"]
        if not grid.use_parameters(parameters.get("distill") or {}, parameters.get("warmup") or {}):
            return
        # Kedro caches the registry's pipelines per process; a run with another grid (a second session in
        # a notebook or a test) must build them again.
        from kedro.framework import project

        if project.PACKAGE_NAME:
            project.pipelines.configure(f"{project.PACKAGE_NAME}.pipeline_registry")
