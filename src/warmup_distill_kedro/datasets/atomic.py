"""Kedro's file datasets, saved atomically and durably: a crash or a power cut mid-save never leaves a
partial file where a reader (or Kedro's "latest version" lookup) would find it.

Each class writes to a hidden `.<name>.<random>.partial` file next to the target (unique, so that two
writers to one unversioned path never write into the same file), puts its data on disk (`fsync`), renames
it into place and syncs the folder. Kedro lists versions by globbing `<filepath>/*/<name>`, so a version
whose save died is invisible and the previous one stays the latest; an unversioned file keeps its old
content until the rename, and then holds one writer's whole file.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from kedro.io.core import get_filepath_str
from kedro_datasets.json import JSONDataset
from kedro_datasets.matplotlib import MatplotlibDataset
from kedro_datasets.pandas import CSVDataset, ParquetDataset
from kedro_datasets.text import TextDataset

from warmup_distill_kedro.core.durable import fsync_dir, fsync_file, partial_path


def _atomic(base: type) -> type:
    # Kedro wraps every dataset's `save` with versioning checks; call the base's unwrapped `save` so
    # that the checks run once, around the whole write-then-rename.
    base_save = getattr(base.save, "__wrapped__", base.save)

    def save(self: Any, data: Any) -> None:
        final = base._get_save_path(self)  # raises if this version exists: versions are never rewritten
        partial = partial_path(final)
        partial_file, final_file = (get_filepath_str(path, self._protocol) for path in (partial, final))
        local = self._protocol == "file"  # an object store has no fsync: an upload is whole or absent
        self._atomic_target = partial
        try:
            base_save(self, data)
            if local:
                fsync_file(partial_file)  # the data on disk before the rename publishes it
        except BaseException:
            if self._fs.exists(partial_file):
                self._fs.rm(partial_file)
            raise
        finally:
            self._atomic_target = None
        self._fs.mv(partial_file, final_file)
        if local:
            folder = PurePosixPath(final_file).parent
            fsync_dir(folder)  # the rename itself
            if self._version is not None:
                fsync_dir(folder.parent)  # the version's folder, new

    def _get_save_path(self: Any) -> PurePosixPath:
        target = getattr(self, "_atomic_target", None)
        return target if target is not None else base._get_save_path(self)

    return type(
        f"Atomic{base.__name__}",
        (base,),
        {
            "save": save,
            "_get_save_path": _get_save_path,
            "__module__": __name__,
            "__doc__": f"{base.__name__}, saved to a partial file and renamed into place.",
        },
    )


AtomicParquetDataset = _atomic(ParquetDataset)
AtomicCSVDataset = _atomic(CSVDataset)
AtomicJSONDataset = _atomic(JSONDataset)
AtomicTextDataset = _atomic(TextDataset)
AtomicMatplotlibDataset = _atomic(MatplotlibDataset)
