"""Kedro's file datasets, saved atomically: a crash mid-save never leaves a partial file where a reader
(or Kedro's "latest version" lookup) would find it.

Each class writes to a hidden `.<name>.partial` file next to the target, then renames it into place.
Kedro lists versions by globbing `<filepath>/*/<name>`, so a version whose save died is invisible and
the previous one stays the latest; an unversioned file keeps its old content until the rename.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from kedro.io.core import get_filepath_str
from kedro_datasets.json import JSONDataset
from kedro_datasets.matplotlib import MatplotlibDataset
from kedro_datasets.pandas import CSVDataset, ParquetDataset
from kedro_datasets.text import TextDataset


def _atomic(base: type) -> type:
    # Kedro wraps every dataset's `save` with versioning checks; call the base's unwrapped `save` so
    # that the checks run once, around the whole write-then-rename.
    base_save = getattr(base.save, "__wrapped__", base.save)

    def save(self: Any, data: Any) -> None:
        final = base._get_save_path(self)  # raises if this version exists: versions are never rewritten
        partial = final.parent / f".{final.name}.partial"
        self._atomic_target = partial
        try:
            base_save(self, data)
        except BaseException:
            if self._fs.exists(get_filepath_str(partial, self._protocol)):
                self._fs.rm(get_filepath_str(partial, self._protocol))
            raise
        finally:
            self._atomic_target = None
        self._fs.mv(get_filepath_str(partial, self._protocol), get_filepath_str(final, self._protocol))

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
