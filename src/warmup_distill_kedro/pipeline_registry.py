"""Project pipelines: every folder under pipelines/ with a create_pipeline() is registered by name."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

# The demo flow, in order. Later stages join this list as they land.
DEMO_PIPELINES = ("data", "bootstrap")


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum(
        (pipelines[name] for name in DEMO_PIPELINES if name in pipelines), Pipeline([])
    )
    return pipelines
