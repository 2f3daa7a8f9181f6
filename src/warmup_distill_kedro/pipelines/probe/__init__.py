"""The `probe` pipeline."""

from warmup_distill_kedro.pipelines.probe.pipeline import create_pipeline

__all__ = ["create_pipeline"]
