"""The `bootstrap` pipeline."""

from warmup_distill_kedro.pipelines.bootstrap.pipeline import create_pipeline

__all__ = ["create_pipeline"]
