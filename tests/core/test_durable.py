"""core/durable.py, saves that survive a power cut: unique partial names, and a folder's files on disk
before its folders, deepest first (its users' tests check the order around the rename)."""

from __future__ import annotations

import os

from tests.helpers import DiskEvents
from warmup_distill_kedro.core.durable import fsync_tree, partial_path


def test_a_partial_name_is_hidden_next_to_the_final_one_and_new_every_time(tmp_path):
    final = tmp_path / "table.parquet"
    names = {partial_path(final) for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert name.parent == tmp_path and name.name.startswith(".table.parquet.")
        assert name.name.endswith(".partial")


def test_a_tree_is_synced_files_first_then_its_folders_deepest_first(tmp_path, monkeypatch):
    root = tmp_path / "checkpoint"
    (root / "sub" / "deeper").mkdir(parents=True)
    files = [root / "config.json", root / "sub" / "weights.bin", root / "sub" / "deeper" / "x.txt"]
    for file in files:
        file.write_text("data")
    os.symlink(files[0], root / "link")  # a link is not synced through: its target is one of the files
    disk = DiskEvents(monkeypatch)
    fsync_tree(root)
    synced = [path for _, path in disk.events]
    assert sorted(synced[:3]) == sorted(map(str, files))
    assert synced[3:] == [str(root / "sub" / "deeper"), str(root / "sub"), str(root)]
