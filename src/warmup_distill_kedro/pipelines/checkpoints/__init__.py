"""The `checkpoints` pipeline."""

from warmup_distill_kedro.pipelines.checkpoints.pipeline import create_pipeline

__all__ = ["create_pipeline"]
