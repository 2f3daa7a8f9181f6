"""The cells of the distill grid: student variants x objectives, as the run's parameters list them.

Kedro builds pipelines without parameters, but the grid's shape is a parameter (`distill.variants`,
`distill.objectives`, overridable with `--params`). `GridParametersHook` reads them from the run's
config loader when the context is created, which Kedro does before it asks the registry for pipelines.
Without a context (a bare `register_pipelines()` call) the defaults below apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kedro.framework.hooks import hook_impl

VARIANTS: tuple[str, ...] = ("vanilla", "warmup", "control")
# Which checkpoint each variant starts distillation from. `control` is the fairness control: the vanilla
# student given warmup's extra steps as plain SFT on the same prompts' gold responses.
STARTING_CHECKPOINTS: dict[str, str] = {
    "vanilla": "student_model",
    "warmup": "student_warmup",
    "control": "student_control",
}
DEFAULT_VARIANTS: tuple[str, ...] = ("vanilla", "warmup")
DEFAULT_OBJECTIVES: tuple[str, ...] = ("fkl", "rkl", "js", "skl", "srkl", "akl", "dskd", "sft")

_distill_parameters: dict[str, Any] = {}


class GridParametersHook:
    """Remembers the `distill` parameters of the run being set up (CLI `--params` included)."""

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        current = dict(context.config_loader["parameters"].get("distill") or {})
        if current == _distill_parameters:
            return
        _distill_parameters.clear()
        _distill_parameters.update(current)
        # Kedro caches the registry's pipelines per process; a run with another grid (a second session in
        # a notebook or a test) must build them again.
        from kedro.framework import project

        if project.PACKAGE_NAME:
            project.pipelines.configure(f"{project.PACKAGE_NAME}.pipeline_registry")


def grid_cells(parameters: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """(variant, objective) for every cell, variants outermost."""
    parameters = _distill_parameters if parameters is None else parameters
    variants = _names(parameters.get("variants", DEFAULT_VARIANTS), "distill.variants", VARIANTS)
    objectives = _names(parameters.get("objectives", DEFAULT_OBJECTIVES), "distill.objectives", None)
    return [(variant, objective) for variant in variants for objective in objectives]


def _names(value: Any, parameter: str, allowed: Sequence[str] | None) -> list[str]:
    names = [value] if isinstance(value, str) else list(value)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{parameter} must be a non-empty list of names, got {value!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{parameter} lists a name twice: {names}")
    if allowed is not None and (unknown := sorted(set(names) - set(allowed))):
        raise ValueError(f"{parameter}: unknown {unknown}; choose from {list(allowed)}")
    return names
