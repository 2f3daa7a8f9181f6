"""Custom Kedro datasets: `save_pretrained` folders, saved atomically and versioned by Kedro."""

from warmup_distill_kedro.datasets.directory import (
    COMPLETE_MARKER,
    AtomicDirectoryDataset,
    CheckpointDataset,
    TokenizerDataset,
)

__all__ = ["COMPLETE_MARKER", "AtomicDirectoryDataset", "CheckpointDataset", "TokenizerDataset"]
