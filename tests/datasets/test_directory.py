"""Atomic, versioned `save_pretrained` folders as Kedro datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from kedro.io import DataCatalog
from kedro.io.core import DatasetError, Version

import warmup_distill_kedro.datasets.directory as directory_module
from tests.helpers import DiskEvents, assert_same_weights, bpe_tokenizer, tiny_checkpoint
from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.datasets import (
    COMPLETE_MARKER,
    AtomicDirectoryDataset,
    CheckpointDataset,
    TokenizerDataset,
)

SAMPLE = "Tom has 12 apples and eats 3. How many are left? 12 - 3 = 9."
V1 = "2024-01-01T00.00.00.000Z"
V2 = "2024-01-02T00.00.00.000Z"


@pytest.fixture(scope="module")
def tokenizer():
    torch.set_num_threads(1)
    words = ["apples", "pears", "has", "eats", "left", "many", "how", "are", "and", "the", "sum"]
    texts = [f"{w} {i} {words[(i * 3) % len(words)]} {i * 7} = {i + 5}." for i, w in enumerate(words * 4)]
    return bpe_tokenizer(texts)


@pytest.fixture(scope="module")
def checkpoint(tokenizer) -> Checkpoint:
    return tiny_checkpoint(tokenizer, seed=0, metadata={"produced_by": "test", "step": 7})


@pytest.fixture(scope="module")
def other_checkpoint(tokenizer) -> Checkpoint:
    return tiny_checkpoint(tokenizer, seed=1, metadata={"produced_by": "other"})


def versioned(path: Path, load: str | None = None, save: str | None = None) -> CheckpointDataset:
    return CheckpointDataset(filepath=str(path), version=Version(load, save))


def temp_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def test_round_trip_keeps_weights_tokens_and_metadata(tmp_path, checkpoint):
    path = tmp_path / "student"
    versioned(path, save=V1).save(checkpoint)

    folder = path / V1 / "student"
    assert (folder / COMPLETE_MARKER).is_file()
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["dataset"].endswith("CheckpointDataset") and marker["version"] == V1 and marker["saved_at"]

    loaded = versioned(path).load()
    assert_same_weights(checkpoint.model, loaded.model)
    assert loaded.tokenizer(SAMPLE)["input_ids"] == checkpoint.tokenizer(SAMPLE)["input_ids"]
    assert loaded.metadata["produced_by"] == "test" and loaded.metadata["step"] == 7
    assert loaded.metadata["catalog_version"] == V1
    assert loaded.metadata["path"] == str(folder)
    assert temp_leftovers(tmp_path) == []


def test_every_file_is_on_disk_before_the_rename_and_the_rename_after(tmp_path, checkpoint, monkeypatch):
    """After a power cut a version under its final name is whole: weights, tokenizer, metadata and marker
    were synced before the rename that published the folder, the folders after."""
    path = tmp_path / "student"
    disk = DiskEvents(monkeypatch)
    versioned(path, save=V1).save(checkpoint)
    temporary, final, renamed_at = disk.the_rename()
    assert final == str(path / V1 / "student")
    files = [p for p in Path(final).rglob("*") if p.is_file()]
    assert {"model.safetensors", "config.json", COMPLETE_MARKER} <= {p.name for p in files}
    for file in files:
        assert disk.synced(Path(temporary) / file.relative_to(final), before=renamed_at), file.name
    assert disk.synced(temporary, before=renamed_at)
    assert disk.synced(path / V1, after=renamed_at) and disk.synced(path, after=renamed_at)


def test_two_versions_latest_and_pinned(tmp_path, checkpoint, other_checkpoint):
    path = tmp_path / "student"
    versioned(path, save=V1).save(checkpoint)
    versioned(path, save=V2).save(other_checkpoint)

    dataset = versioned(path)
    assert dataset.list_versions(full_path=False) == [V2, V1]
    assert dataset.list_versions() == [str(path / V2 / "student"), str(path / V1 / "student")]
    latest = dataset.load()
    assert latest.metadata["produced_by"] == "other" and latest.metadata["catalog_version"] == V2
    assert_same_weights(other_checkpoint.model, latest.model)

    older = versioned(path, load=V1).load()
    assert older.metadata["produced_by"] == "test" and older.metadata["catalog_version"] == V1
    assert_same_weights(checkpoint.model, older.model)


def test_saving_an_existing_version_is_refused(tmp_path, checkpoint, other_checkpoint):
    path = tmp_path / "student"
    versioned(path, save=V1).save(checkpoint)
    with pytest.raises(DatasetError, match="must not exist"):
        versioned(path, save=V1).save(other_checkpoint)
    # an incomplete folder at the target is not overwritten either
    (path / V2 / "student").mkdir(parents=True)
    with pytest.raises(DatasetError, match="never overwritten"):
        versioned(path, save=V2).save(other_checkpoint)
    assert versioned(path, load=V1).load().metadata["produced_by"] == "test"
    assert temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_crash_during_save_leaves_no_version(tmp_path, checkpoint, other_checkpoint, monkeypatch, error):
    path = tmp_path / "student"
    versioned(path, save=V1).save(checkpoint)
    before = versioned(path).list_versions()
    assert versioned(path).exists()

    def crashing_save(ckpt: Checkpoint, folder) -> None:
        ckpt.model.save_pretrained(str(folder))  # weights written, tokenizer + metadata never
        raise error

    monkeypatch.setattr(directory_module, "save_checkpoint", crashing_save)
    # Kedro wraps ordinary errors in a DatasetError; an interrupt goes through as it is
    expected = KeyboardInterrupt if isinstance(error, KeyboardInterrupt) else DatasetError
    with pytest.raises(expected) as info:
        versioned(path, save=V2).save(other_checkpoint)
    assert info.value is error or info.value.__cause__ is error

    dataset = versioned(path)
    assert dataset.list_versions() == before
    assert dataset.exists()
    assert not versioned(path, load=V2).exists()
    assert dataset.load().metadata["catalog_version"] == V1
    assert temp_leftovers(tmp_path) == []
    assert not (path / V2).exists()


def test_crash_on_first_save_leaves_nothing(tmp_path, checkpoint, monkeypatch):
    path = tmp_path / "models" / "student"

    def crashing_write(self, data, folder, **save_args):
        (folder / "config.json").write_text("{}")
        raise OSError("no space left")

    monkeypatch.setattr(CheckpointDataset, "_write", crashing_write)
    with pytest.raises(DatasetError, match="no space left"):
        versioned(path).save(checkpoint)
    assert not versioned(path).exists()
    assert versioned(path).list_versions() == []
    assert temp_leftovers(tmp_path) == []
    with pytest.raises(DatasetError, match="Did not find any versions"):
        versioned(path).load()


def test_version_without_marker_is_ignored_and_refused_when_pinned(tmp_path, checkpoint):
    path = tmp_path / "student"
    versioned(path, save=V1).save(checkpoint)
    hand_made = path / V2 / "student"
    shutil.copytree(path / V1 / "student", hand_made)
    (hand_made / COMPLETE_MARKER).unlink()

    dataset = versioned(path)
    assert dataset.list_versions(full_path=False) == [V1]
    assert dataset.load().metadata["catalog_version"] == V1
    pinned = versioned(path, load=V2)
    assert not pinned.exists()
    with pytest.raises(DatasetError, match="incomplete"):
        pinned.load()
    with pytest.raises(DatasetError, match="not found"):
        versioned(path, load="2030-01-01T00.00.00.000Z").load()


def test_unversioned_loads_a_plain_hugging_face_folder(tmp_path, checkpoint):
    hf = tmp_path / "Qwen-tiny"
    checkpoint.model.save_pretrained(str(hf))  # tokenizer at the top, no marker, no metadata
    checkpoint.tokenizer.save_pretrained(str(hf))
    assert not (hf / COMPLETE_MARKER).exists()

    dataset = CheckpointDataset(filepath=str(hf))
    assert dataset.exists()
    loaded = dataset.load()
    assert_same_weights(checkpoint.model, loaded.model)
    assert loaded.tokenizer(SAMPLE)["input_ids"] == checkpoint.tokenizer(SAMPLE)["input_ids"]
    assert loaded.metadata["catalog_version"] is None and loaded.metadata["path"] == str(hf)

    half = CheckpointDataset(filepath=str(hf), load_args={"dtype": "bfloat16"}).load()
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_unversioned_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "Qwen2.5-7B-Instruct"
    dataset = CheckpointDataset(filepath=str(missing))
    assert not dataset.exists()
    with pytest.raises(DatasetError, match="Qwen2.5-7B-Instruct"):
        dataset.load()


def test_unversioned_save_refuses_an_existing_folder(tmp_path, checkpoint, other_checkpoint):
    path = tmp_path / "out" / "student"
    dataset = CheckpointDataset(filepath=str(path))
    dataset.save(checkpoint)
    assert (path / COMPLETE_MARKER).is_file() and dataset.exists()
    with pytest.raises(DatasetError, match="never overwritten"):
        dataset.save(other_checkpoint)
    assert dataset.load().metadata["produced_by"] == "test"
    assert temp_leftovers(tmp_path) == []


def test_unknown_load_args_fail_early(tmp_path):
    with pytest.raises(DatasetError, match="unknown load_args"):
        CheckpointDataset(filepath=str(tmp_path / "m"), load_args={"torch_dtype": "float16"})
    with pytest.raises(DatasetError, match="local paths only"):
        CheckpointDataset(filepath="s3://bucket/model")


def test_tokenizer_round_trip(tmp_path, tokenizer):
    path = tmp_path / "tokenizer"
    TokenizerDataset(filepath=str(path), version=Version(None, V1)).save(tokenizer)
    loaded = TokenizerDataset(filepath=str(path), version=Version(None, None)).load()
    assert loaded(SAMPLE)["input_ids"] == tokenizer(SAMPLE)["input_ids"]
    assert len(loaded) == len(tokenizer)
    assert loaded.eos_token == tokenizer.eos_token and loaded.pad_token == tokenizer.pad_token


def test_base_class_is_abstract_in_practice(tmp_path):
    with pytest.raises(DatasetError):  # Kedro wraps the NotImplementedError
        AtomicDirectoryDataset(filepath=str(tmp_path / "x")).save(object())
    assert temp_leftovers(tmp_path) == []


def test_through_a_kedro_data_catalog(tmp_path, checkpoint, other_checkpoint, tokenizer):
    config = {
        "student": {
            "type": "warmup_distill_kedro.datasets.CheckpointDataset",
            "filepath": str(tmp_path / "06_models" / "student"),
            "versioned": True,
        },
        "student_tokenizer": {
            "type": "warmup_distill_kedro.datasets.TokenizerDataset",
            "filepath": str(tmp_path / "06_models" / "tokenizer"),
            "versioned": True,
        },
    }
    DataCatalog.from_config(config, save_version=V1).save("student", checkpoint)
    catalog = DataCatalog.from_config(config, save_version=V2)
    catalog.save("student", other_checkpoint)
    catalog.save("student_tokenizer", tokenizer)

    assert catalog.exists("student")
    latest = catalog.load("student")
    assert latest.metadata["catalog_version"] == V2 and latest.metadata["produced_by"] == "other"
    pinned = catalog.load("student", version=V1)
    assert pinned.metadata["catalog_version"] == V1
    assert_same_weights(checkpoint.model, pinned.model)
    assert catalog.load("student_tokenizer")(SAMPLE)["input_ids"] == tokenizer(SAMPLE)["input_ids"]

    pinned_catalog = DataCatalog.from_config(config, load_versions={"student": V1})
    assert pinned_catalog.load("student").metadata["catalog_version"] == V1
    assert temp_leftovers(tmp_path) == []
