"""The `data` pipeline."""

from warmup_distill_kedro.pipelines.data.pipeline import create_pipeline

__all__ = ["create_pipeline"]
