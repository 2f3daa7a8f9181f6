"""The `warmup` pipeline."""

from warmup_distill_kedro.pipelines.warmup.pipeline import create_pipeline

__all__ = ["create_pipeline"]
