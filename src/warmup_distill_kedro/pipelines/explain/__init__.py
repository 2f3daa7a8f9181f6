"""The `explain` pipeline."""

from warmup_distill_kedro.pipelines.explain.pipeline import create_pipeline

__all__ = ["create_pipeline"]
