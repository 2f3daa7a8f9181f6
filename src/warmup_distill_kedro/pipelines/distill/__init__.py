"""The `distill` pipeline."""

from warmup_distill_kedro.pipelines.distill.pipeline import create_pipeline

__all__ = ["create_pipeline"]
