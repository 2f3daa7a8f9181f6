"""The `check` pipeline."""

from warmup_distill_kedro.pipelines.check.pipeline import create_pipeline

__all__ = ["create_pipeline"]
