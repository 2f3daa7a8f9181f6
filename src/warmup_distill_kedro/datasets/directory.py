"""Kedro datasets for folders written by `save_pretrained`, saved atomically.

A save writes into a hidden temporary sibling folder (`<parent>/.<name>.tmp-<random>`), writes a
completion marker (`.complete`) inside it last, puts every file on disk (`fsync`), then renames it to
its final path and syncs the parent folder. A version therefore either exists complete or not at all,
even after a power cut: a crash leaves no visible version, and versions without the marker (a folder
made by hand, a copy cut short) are ignored by `list_versions`, `exists()` and "latest".

With `versioned: false` the dataset reads `filepath` as it is, marker or not: this is how the catalog
points at a Hugging Face checkpoint folder downloaded elsewhere.

    student_model:                          # a versioned output
      type: warmup_distill_kedro.datasets.CheckpointDataset
      filepath: data/06_models/student
      versioned: true

    teacher_model:                          # an external Hugging Face checkpoint folder
      type: warmup_distill_kedro.datasets.CheckpointDataset
      filepath: /models/Qwen2.5-7B-Instruct
      load_args:
        dtype: bfloat16

Local filesystem only: the atomic rename needs the temporary and the final folder on one filesystem.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from kedro.io.core import (
    AbstractVersionedDataset,
    DatasetError,
    Version,
    VersionNotFoundError,
    get_protocol_and_path,
)
from transformers import PreTrainedTokenizerBase

from warmup_distill_kedro.core.durable import fsync_dir, fsync_tree
from warmup_distill_kedro.core.models.conversion import AlreadyConverted
from warmup_distill_kedro.core.models.modeling import (
    METADATA_FILE,
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from warmup_distill_kedro.core.models.tokenization import load_tokenizer, save_tokenizer

COMPLETE_MARKER = ".complete"
logger = logging.getLogger(__name__)


def is_complete(folder: str | os.PathLike[str]) -> bool:
    """Whether `folder` is a finished save (holds the completion marker)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


class AtomicDirectoryDataset(AbstractVersionedDataset[Any, Any]):
    """Base class for datasets stored as one folder, saved atomically, optionally versioned.

    Subclasses implement `_write(data, folder, **save_args)` and `_read(folder, **load_args)`; they
    may list the arguments they accept in `LOAD_ARGS` / `SAVE_ARGS` so that a typo in the catalog
    fails when the catalog is built, not at the end of a training run.
    """

    LOAD_ARGS: ClassVar[frozenset[str] | None] = None  # None: anything goes
    SAVE_ARGS: ClassVar[frozenset[str] | None] = None

    def __init__(
        self,
        filepath: str,
        version: Version | None = None,
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        protocol, path = get_protocol_and_path(str(filepath))
        if protocol != "file":
            raise DatasetError(
                f"{type(self).__name__} saves by renaming a folder and supports local paths only, "
                f"got protocol '{protocol}' in '{filepath}'"
            )
        self._load_args = dict(load_args or {})
        self._save_args = dict(save_args or {})
        self._check_args("load_args", self._load_args, self.LOAD_ARGS)
        self._check_args("save_args", self._save_args, self.SAVE_ARGS)
        self.metadata = metadata
        super().__init__(filepath=PurePosixPath(path), version=version, exists_function=is_complete)

    def _check_args(self, name: str, given: dict[str, Any], allowed: frozenset[str] | None) -> None:
        if allowed is None:
            return
        unknown = sorted(set(given) - allowed)
        if unknown:
            raise DatasetError(
                f"{type(self).__name__}: unknown {name} {unknown}; accepted: {sorted(allowed) or 'none'}"
            )

    # -- to implement ---------------------------------------------------------------------------------

    def _write(self, data: Any, folder: Path, **save_args: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _write(data, folder)")

    def _read(self, folder: Path, **load_args: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement _read(folder)")

    def _after_load(self, data: Any, folder: Path, version: str | None) -> Any:
        """Hook to annotate loaded data with where it came from; returns the data."""
        return data

    # -- Kedro API ------------------------------------------------------------------------------------

    def load(self) -> Any:
        folder = Path(self._get_load_path())
        version = self.resolve_load_version()
        if not folder.is_dir():
            if self._version:
                raise DatasetError(f"{self}: version '{version}' not found: no folder {folder}")
            raise DatasetError(f"{self}: folder not found: {folder}")
        if self._version and not is_complete(folder):
            raise DatasetError(
                f"{self}: version '{version}' at {folder} is incomplete (no {COMPLETE_MARKER} marker): "
                "its save was interrupted or the folder was not written by this dataset"
            )
        data = self._read(folder, **self._load_args)
        return self._after_load(data, folder, version)

    def save(self, data: Any) -> None:
        target = Path(self._get_save_path())  # refuses an existing complete version
        if os.path.lexists(target):
            what = "an existing version" if self._version else "an existing folder"
            raise DatasetError(
                f"{self}: refusing to save over {what} at {target}: versioned outputs are never overwritten"
                + ("" if self._version else "; delete it or use versioned: true")
            )
        parent = target.parent
        created = [p for p in (parent, *parent.parents) if not p.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_temp_sibling(target)
        try:
            self._write(data, tmp, **self._save_args)
            self._write_marker(tmp)
            fsync_tree(tmp)  # every file on disk before the rename publishes the folder
            os.rename(tmp, target)  # atomic; fails on a non-empty target that appeared meanwhile
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            for folder in created:  # the version folder we made, if nothing else landed there
                try:
                    folder.rmdir()
                except OSError:
                    break
            if isinstance(exc, FileNotFoundError | NotADirectoryError):
                # Kedro reports these as "a file with the same name already exists"; say what happened.
                raise DatasetError(f"{self}: save failed, nothing was written: {exc}") from exc
            raise
        for folder in dict.fromkeys([parent, *(made.parent for made in created)]):
            fsync_dir(folder)  # the rename itself, and the folders made for it

    def _write_marker(self, folder: Path) -> None:
        marker = {
            "saved_at": datetime.now(tz=UTC).isoformat(),
            "dataset": f"{type(self).__module__}.{type(self).__qualname__}",
            "version": self.resolve_save_version(),
        }
        with open(folder / COMPLETE_MARKER, "w") as handle:
            json.dump(marker, handle, indent=2)

    def _exists(self) -> bool:
        path = Path(self._get_load_path())  # VersionNotFoundError -> exists() is False
        return is_complete(path) if self._version else path.is_dir()

    def _describe(self) -> dict[str, Any]:
        return {
            "filepath": self._filepath,
            "version": self._version,
            "load_args": self._load_args,
            "save_args": self._save_args,
        }

    def _release(self) -> None:
        super()._release()


def _make_temp_sibling(target: Path) -> Path:
    """A new empty hidden folder next to `target` (same filesystem, so the final rename is atomic).

    Unlike `tempfile.mkdtemp` (mode 0700) it gets the usual umask permissions, which the renamed
    folder keeps.
    """
    for _ in range(100):
        tmp = target.parent / f".{target.name}.tmp-{secrets.token_hex(6)}"
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        return tmp
    raise DatasetError(f"could not create a temporary folder next to {target}")


class CheckpointDataset(AtomicDirectoryDataset):
    """A `Checkpoint` (model + tokenizer + metadata) as a `save_pretrained` folder.

    Loads our own checkpoints and plain Hugging Face checkpoint folders alike. `load_args`:
    `dtype` ("float32", "bfloat16", "float16"). The loaded metadata gains `catalog_version` (the
    version loaded, None when unversioned) and `path` (the folder), for lineage.
    """

    LOAD_ARGS = frozenset({"dtype"})
    SAVE_ARGS = frozenset()

    def save(self, data: Checkpoint | AlreadyConverted) -> None:
        if isinstance(data, AlreadyConverted):  # the latest version already holds these weights
            logger.info(
                "%s: its latest version %s already holds these weights (same source); nothing saved",
                self,
                data.metadata.get("catalog_version"),
            )
            return
        super().save(data)

    def _write(self, data: Checkpoint, folder: Path, **save_args: Any) -> None:
        if not isinstance(data, Checkpoint):
            raise DatasetError(f"{self}: expected a Checkpoint, got {type(data).__name__}")
        save_checkpoint(data, folder)

    def _read(self, folder: Path, **load_args: Any) -> Checkpoint:
        return load_checkpoint(folder, **load_args)

    def _after_load(self, data: Checkpoint, folder: Path, version: str | None) -> Checkpoint:
        data.metadata["catalog_version"] = version
        data.metadata["path"] = str(folder)
        return data


class TokenizerDataset(AtomicDirectoryDataset):
    """A tokenizer as a `save_pretrained` folder, loaded without a model config interfering."""

    LOAD_ARGS = frozenset()
    SAVE_ARGS = frozenset()

    def _write(self, data: PreTrainedTokenizerBase, folder: Path, **save_args: Any) -> None:
        if not isinstance(data, PreTrainedTokenizerBase):
            raise DatasetError(f"{self}: expected a tokenizer, got {type(data).__name__}")
        save_tokenizer(data, folder)

    def _read(self, folder: Path, **load_args: Any) -> PreTrainedTokenizerBase:
        return load_tokenizer(folder)


class CheckpointMetadataDataset(AtomicDirectoryDataset):
    """Read-only: the `checkpoint_meta.json` of the latest complete version of a versioned checkpoint folder
    (`filepath` as the checkpoint's entry has it), `{}` when there is none yet. What a node reads to decide
    that a conversion was already made, without loading the weights."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        super().__init__(filepath=filepath, version=Version(None, None), metadata=metadata)

    def load(self) -> dict[str, Any]:
        try:
            if not super()._exists():
                return {}
        except VersionNotFoundError:
            return {}
        folder = Path(self._get_load_path())
        meta_file = folder / METADATA_FILE
        found = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        return {**found, "catalog_version": self.resolve_load_version()}

    def save(self, data: Any) -> None:
        raise DatasetError(f"{self}: read-only (the checkpoint's own entry writes this folder)")

    def _exists(self) -> bool:
        return True  # no conversion yet is an answer too: `{}`
