"""Checkpoints from a user's files: a GGUF file transformers cannot load and a folder that is not a causal
LM are refused naming the parameter and the file; a folder converts once."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import ViTConfig

from tests.helpers import MATH_CORPUS, assert_same_weights, bpe_tokenizer, tiny_checkpoint
from warmup_distill_kedro.core.errors import UserInputError
from warmup_distill_kedro.core.models.conversion import (
    AlreadyConverted,
    checkpoint_from_folder,
    checkpoint_from_gguf,
    convert_once,
)
from warmup_distill_kedro.core.models.modeling import save_checkpoint
from warmup_distill_kedro.core.models.sources import locate_source

PARAMETER = "checkpoints.mine.source"


def _gguf_of_architecture(path: Path, architecture: str) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_of_an_architecture_transformers_cannot_load_is_refused(tmp_path):
    path = _gguf_of_architecture(tmp_path / "odd.gguf", "notanarch")
    with pytest.raises(
        UserInputError, match=rf"^{PARAMETER}: .*odd\.gguf: transformers cannot load .*notanarch"
    ):
        checkpoint_from_gguf(path, PARAMETER)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(UserInputError, match=rf"^{PARAMETER}: .*model\.gguf is not a GGUF file"):
        checkpoint_from_gguf(path, PARAMETER)
    with pytest.raises(UserInputError, match=rf"^{PARAMETER}: GGUF file not found: .*gone\.gguf"):
        checkpoint_from_gguf(tmp_path / "gone.gguf", PARAMETER)


def test_a_folder_that_is_missing_or_not_a_causal_lm_is_refused(tmp_path):
    with pytest.raises(UserInputError, match=rf"^{PARAMETER}: .*absent does not exist"):
        checkpoint_from_folder(tmp_path / "absent", PARAMETER)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserInputError, match=rf"^{PARAMETER}: .*empty has no config.json"):
        checkpoint_from_folder(empty, PARAMETER)
    encoder = tmp_path / "vit"
    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(
        encoder
    )
    with pytest.raises(
        UserInputError, match=rf"^{PARAMETER}: .*vit: a 'vit' model is not a causal language model"
    ):
        checkpoint_from_folder(encoder, PARAMETER)


def test_a_folder_converts_to_float32_once(tmp_path):
    original = tiny_checkpoint(bpe_tokenizer(MATH_CORPUS), metadata={"stage": "sft"})
    original.model.to(torch.bfloat16)
    save_checkpoint(original, tmp_path / "hf")
    source = locate_source("mine", str(tmp_path / "hf"), tmp_path / "raw")

    converted = convert_once(source, previous={})
    assert converted.model.dtype == torch.float32
    assert_same_weights(converted.model, original.model.float())
    assert converted.metadata["source_sha256"] == source["sha256"]
    assert converted.metadata["source_kind"] == "folder"
    assert converted.metadata["source_metadata"]["stage"] == "sft"

    again = convert_once(source, previous={**converted.metadata, "catalog_version": "v1"})
    assert isinstance(again, AlreadyConverted)
    assert again.metadata["catalog_version"] == "v1"
    changed = convert_once({**source, "sha256": "0" * 64}, previous=converted.metadata)
    assert not isinstance(changed, AlreadyConverted)
