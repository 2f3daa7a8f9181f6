"""The `report` pipeline."""

from warmup_distill_kedro.pipelines.report.pipeline import create_pipeline

__all__ = ["create_pipeline"]
