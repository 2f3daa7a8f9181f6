"""Saves that survive a power cut: data on disk before the rename that publishes it, the rename on disk
after it.

A rename is atomic, but without an `fsync` of the file first, the filesystem may commit the rename before
the data: after a power loss a truncated or empty file sits under its final name. And until the folder
is synced, the rename itself may be lost. Local filesystems only; `fsync` is best effort where a
platform cannot open a folder.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path, PurePath
from typing import TypeVar

PurePathT = TypeVar("PurePathT", bound=PurePath)


def partial_path(final: PurePathT) -> PurePathT:
    """A hidden, unique name next to `final` to write into before the rename: two writers to one path
    never share it (the one that renames last wins, with a whole file)."""
    return final.parent / f".{final.name}.{secrets.token_hex(4)}.partial"


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Put a written file's data on disk (a read-only descriptor suffices on POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Put a folder's entries (a rename into it) on disk; best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike[str]) -> None:
    """Every file under `folder`, then every folder from the deepest up, on disk: before the folder is
    renamed into place."""
    root = Path(folder)
    folders = [root]
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            continue
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            fsync_file(path)
    for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(path)
