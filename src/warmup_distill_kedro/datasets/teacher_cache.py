"""The teacher's top-k cache (core.kd.cache.TeacherTopK) as a catalog dataset: a folder of safetensors
shards and a metadata JSON, saved atomically and versioned like the checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io.core import DatasetError

from warmup_distill_kedro.core.kd.cache import TeacherTopK, load_teacher_topk, save_teacher_topk
from warmup_distill_kedro.datasets.directory import AtomicDirectoryDataset


class TeacherTopKDataset(AtomicDirectoryDataset):
    """`TeacherTopK` as a folder (`shard_*.safetensors`, `teacher_topk.json`). `save_args`: `shard_examples`."""

    LOAD_ARGS = frozenset()
    SAVE_ARGS = frozenset({"shard_examples"})

    def _write(self, data: TeacherTopK, folder: Path, **save_args: Any) -> None:
        if not isinstance(data, TeacherTopK):
            raise DatasetError(f"{self}: expected a TeacherTopK, got {type(data).__name__}")
        save_teacher_topk(data, folder, **save_args)

    def _read(self, folder: Path, **load_args: Any) -> TeacherTopK:
        try:
            return load_teacher_topk(folder)
        except ValueError as error:
            raise DatasetError(f"teacher_topk: {error}") from error
