"""The `evaluate` pipeline."""

from warmup_distill_kedro.pipelines.evaluate.pipeline import create_pipeline

__all__ = ["create_pipeline"]
