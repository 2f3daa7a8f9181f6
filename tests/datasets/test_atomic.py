"""A save that dies midway (a full disk, a killed process) leaves no partial file where readers look."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from kedro.io.core import Version  # noqa: E402

from tests.helpers import DiskEvents  # noqa: E402
from warmup_distill_kedro.datasets import (  # noqa: E402
    AtomicCSVDataset,
    AtomicJSONDataset,
    AtomicMatplotlibDataset,
    AtomicParquetDataset,
    AtomicTextDataset,
)

FIRST, SECOND = "2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"


class DiskFull(OSError):
    pass


class _DyingFile:
    """Writes the first chunk it is given, then fails: a partial file is on disk when the error comes."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        self.handle.write(data[: max(1, len(data) // 2)])
        self.handle.flush()
        raise DiskFull("No space left on device")

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()
        return False


class _DyingFileSystem:
    def __init__(self, fs):
        self.fs = fs

    def open(self, path, mode="rb", **kwargs):
        handle = self.fs.open(path, mode, **kwargs)
        return _DyingFile(handle) if "w" in mode else handle

    def __getattr__(self, name):
        return getattr(self.fs, name)


def _figure(title: str):
    figure, axis = plt.subplots()
    axis.set_title(title)
    return figure


CASES = {
    "parquet": (AtomicParquetDataset, "t.parquet", pd.DataFrame({"x": [1, 2]}), pd.DataFrame({"x": [3]})),
    "csv": (AtomicCSVDataset, "t.csv", pd.DataFrame({"x": [1, 2]}), pd.DataFrame({"x": [3]})),
    "json": (AtomicJSONDataset, "t.json", {"score": 1}, {"score": 2}),
    "text": (AtomicTextDataset, "t.md", "first report", "second report"),
    "png": (AtomicMatplotlibDataset, "t.png", None, None),
}


def _payload(kind: str, value):
    return _figure(kind) if kind == "png" else value


def _same(kind: str, loaded, expected) -> None:
    if isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(loaded, expected)
    else:
        assert loaded == expected


@pytest.mark.parametrize("kind", list(CASES))
def test_a_dying_save_leaves_the_previous_version_the_latest(tmp_path: Path, kind: str) -> None:
    cls, name, first, second = CASES[kind]
    path = tmp_path / name
    cls(filepath=str(path), version=Version(None, FIRST)).save(_payload(kind, first))

    dying = cls(filepath=str(path), version=Version(None, SECOND))
    dying._fs = _DyingFileSystem(dying._fs)
    with pytest.raises(Exception, match="No space left on device"):
        dying.save(_payload(kind, second))

    assert not (path / SECOND / name).exists()  # nothing under the name a reader looks for
    assert not list((path / SECOND).glob(".*.partial"))  # and the partial file is cleaned up
    reader = cls(filepath=str(path), version=Version(None, None))
    assert reader.resolve_load_version() == FIRST
    if kind != "png":  # MatplotlibDataset cannot load
        _same(kind, reader.load(), first)

    cls(filepath=str(path), version=Version(None, SECOND)).save(_payload(kind, second))  # a retry works
    assert cls(filepath=str(path), version=Version(None, None)).resolve_load_version() == SECOND


@pytest.mark.parametrize("kind", ["parquet", "json", "text"])
def test_an_unversioned_file_keeps_its_content_when_a_save_dies(tmp_path: Path, kind: str) -> None:
    cls, name, first, second = CASES[kind]
    path = tmp_path / name
    cls(filepath=str(path)).save(first)
    dying = cls(filepath=str(path))
    dying._fs = _DyingFileSystem(dying._fs)
    with pytest.raises(Exception, match="No space left on device"):
        dying.save(second)
    _same(kind, cls(filepath=str(path)).load(), first)


def test_a_saved_version_is_never_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    AtomicJSONDataset(filepath=str(path), version=Version(None, FIRST)).save({"a": 1})
    with pytest.raises(Exception, match="must not exist"):
        AtomicJSONDataset(filepath=str(path), version=Version(None, FIRST)).save({"a": 2})
    assert AtomicJSONDataset(filepath=str(path), version=Version(FIRST, None)).load() == {"a": 1}


@pytest.mark.parametrize("versioned", [True, False])
def test_the_data_is_on_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch, versioned):
    """After a power cut a file under its final name is whole: its data was synced before the rename that
    published it, and the folder after."""
    path = tmp_path / "t.json"
    dataset = AtomicJSONDataset(filepath=str(path), version=Version(None, FIRST) if versioned else None)
    disk = DiskEvents(monkeypatch)
    dataset.save({"score": 1})
    partial, final, renamed_at = disk.the_rename()
    assert Path(partial).name.endswith(".partial") and Path(partial).parent == Path(final).parent
    assert final == str(path / FIRST / "t.json" if versioned else path)
    assert disk.synced(partial, before=renamed_at)
    assert disk.synced(Path(final).parent, after=renamed_at)
    if versioned:  # the version's folder is new: its entry too
        assert disk.synced(path, after=renamed_at)


class _WritesMeanwhile:
    """A file system whose first write to a file calls `meanwhile()` first: another writer saves then."""

    def __init__(self, fs, meanwhile):
        self.fs, self.meanwhile = fs, meanwhile

    def open(self, path, mode="rb", **kwargs):
        handle = self.fs.open(path, mode, **kwargs)
        if "w" not in mode:
            return handle
        meanwhile, self.meanwhile = self.meanwhile, lambda: None
        write = handle.write

        def write_after_the_other(data):
            meanwhile()
            return write(data)

        handle.write = write_after_the_other
        return handle

    def __getattr__(self, name):
        return getattr(self.fs, name)


def test_two_writers_to_one_unversioned_path_each_write_their_own_partial_file(tmp_path):
    """Each writes a whole file and renames it: the path ends with the last writer's file, never a mix."""
    path = tmp_path / "t.json"
    first, second = {"writer": "first", "rows": list(range(200))}, {"writer": "second"}
    slow = AtomicJSONDataset(filepath=str(path))
    slow._fs = _WritesMeanwhile(slow._fs, lambda: AtomicJSONDataset(filepath=str(path)).save(second))
    slow.save(first)  # the second writer saves in the middle of this save
    assert AtomicJSONDataset(filepath=str(path)).load() == first
    assert not list(tmp_path.glob(".*partial*"))
