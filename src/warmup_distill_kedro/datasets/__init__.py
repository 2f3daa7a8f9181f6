"""Custom Kedro datasets, all saved atomically: `save_pretrained` folders (versioned by Kedro) and
Kedro's own file datasets written to a partial file and renamed into place."""

from warmup_distill_kedro.datasets.atomic import (
    AtomicCSVDataset,
    AtomicJSONDataset,
    AtomicMatplotlibDataset,
    AtomicParquetDataset,
    AtomicTextDataset,
)
from warmup_distill_kedro.datasets.directory import (
    COMPLETE_MARKER,
    AtomicDirectoryDataset,
    CheckpointDataset,
    CheckpointMetadataDataset,
    TokenizerDataset,
)
from warmup_distill_kedro.datasets.report import ReportMarkdownDataset
from warmup_distill_kedro.datasets.teacher_cache import TeacherTopKDataset

__all__ = [
    "COMPLETE_MARKER",
    "AtomicCSVDataset",
    "AtomicDirectoryDataset",
    "AtomicJSONDataset",
    "AtomicMatplotlibDataset",
    "AtomicParquetDataset",
    "AtomicTextDataset",
    "CheckpointDataset",
    "CheckpointMetadataDataset",
    "ReportMarkdownDataset",
    "TeacherTopKDataset",
    "TokenizerDataset",
]
