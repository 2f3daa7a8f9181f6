"""core/models/modeling.py: Qwen2 models built from a tokenizer, and checkpoint folders (ours and the plain
Hugging Face layout)."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from tests.helpers import TINY, assert_same_weights, bpe_tokenizer, token_ids
from warmup_distill_kedro.core.models.modeling import (
    METADATA_FILE,
    TOKENIZER_SUBFOLDER,
    Checkpoint,
    ModelSize,
    build_model,
    check_tokenizer_fits,
    count_parameters,
    disable_dropout,
    load_checkpoint,
    save_checkpoint,
)

torch.set_num_threads(1)

CORPUS = ["Question: what is 12 plus 345?\nAnswer: 357", "The cat sat on the mat. Héllo wörld!"] * 10
TEXTS = ["Question: 7 + 8?\nAnswer: 15", "Héllo, the mat! 日本"]


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(CORPUS)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_build_model_matches_tokenizer(tokenizer):
    model = build_model(TINY, tokenizer, seed=0)
    assert model.config.vocab_size == len(tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.get_output_embeddings().out_features == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 1
    assert model.config.num_key_value_heads == 2  # defaults to num_attention_heads
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) > 0
    logits = _logits(model, token_ids(tokenizer, TEXTS[0]))
    assert logits.shape[-1] == len(tokenizer)


def test_build_model_seeded(tokenizer):
    a = build_model(TINY, tokenizer, seed=3)
    b = build_model(TINY, tokenizer, seed=3)
    c = build_model(TINY, tokenizer, seed=4)
    assert_same_weights(a, b)
    assert not torch.equal(a.get_input_embeddings().weight, c.get_input_embeddings().weight)


def test_untied_embeddings(tokenizer):
    size = TINY.model_copy(update={"tie_word_embeddings": False})
    model = build_model(size, tokenizer, seed=0)
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    tied = build_model(TINY, tokenizer, seed=0)
    assert tied.get_input_embeddings().weight.data_ptr() == tied.get_output_embeddings().weight.data_ptr()


def test_model_size_heads_must_divide_hidden():
    with pytest.raises(ValidationError) as excinfo:
        ModelSize(hidden_size=30, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32)
    message = str(excinfo.value)
    assert "hidden_size 30" in message and "num_attention_heads 4" in message


def test_model_size_kv_heads_must_divide_heads():
    with pytest.raises(ValidationError, match="num_key_value_heads"):
        ModelSize(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=3,
            intermediate_size=32,
        )
    ok = ModelSize(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
    )
    assert ok.num_key_value_heads == 2


def test_checkpoint_round_trip(tokenizer, tmp_path):
    model = build_model(TINY, tokenizer, seed=1)
    metadata = {"stage": "bootstrap", "steps": 12, "nested": {"lr": 0.001, "tags": ["a", "b"]}}
    folder = tmp_path / "ckpt"
    save_checkpoint(Checkpoint(model=model, tokenizer=tokenizer, metadata=metadata), folder)
    assert (folder / "config.json").is_file()
    assert (folder / TOKENIZER_SUBFOLDER / "tokenizer.json").is_file()
    assert not (folder / "tokenizer.json").exists()
    assert json.loads((folder / METADATA_FILE).read_text()) == metadata

    loaded = load_checkpoint(folder)
    assert_same_weights(model, loaded.model)
    assert loaded.metadata == metadata
    assert len(loaded.tokenizer) == len(tokenizer)
    assert loaded.tokenizer.eos_token_id == tokenizer.eos_token_id
    assert loaded.tokenizer.pad_token_id == tokenizer.pad_token_id
    for text in TEXTS:
        assert token_ids(loaded.tokenizer, text) == token_ids(tokenizer, text)
    ids = token_ids(tokenizer, TEXTS[0])
    assert torch.equal(_logits(model, ids), _logits(loaded.model, ids))


def test_load_checkpoint_bfloat16(tokenizer, tmp_path):
    model = build_model(TINY, tokenizer, seed=1)
    save_checkpoint(Checkpoint(model=model, tokenizer=tokenizer), tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt", dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_load_hugging_face_layout(tokenizer, tmp_path):
    """Tokenizer files next to config.json and no metadata: a checkpoint downloaded from elsewhere."""
    model = build_model(TINY, tokenizer, seed=2)
    model.generation_config.pad_token_id = None  # as in checkpoints that never set one
    folder = tmp_path / "hf"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))

    loaded = load_checkpoint(folder)
    assert_same_weights(model, loaded.model)
    assert loaded.metadata == {"source": str(folder)}
    for text in TEXTS:
        assert token_ids(loaded.tokenizer, text) == token_ids(tokenizer, text)
    assert loaded.model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_check_tokenizer_fits_refuses_bigger_tokenizer(tokenizer):
    big = bpe_tokenizer(CORPUS * 3 + ["zebra quokka xylophone jumps"] * 5, 330)
    small_tok = bpe_tokenizer(CORPUS, 280)
    model = build_model(TINY, small_tok, seed=0)
    rows = model.get_input_embeddings().num_embeddings
    assert len(big) > rows
    with pytest.raises(ValueError) as excinfo:
        check_tokenizer_fits(model, big, "my-origin")
    message = str(excinfo.value)
    assert str(len(big)) in message and str(rows) in message and "my-origin" in message
    # Fewer ids than rows is fine (Qwen2.5 pads its embedding).
    check_tokenizer_fits(build_model(TINY, big, seed=0), small_tok, "ok")


def test_load_checkpoint_refuses_mismatched_tokenizer(tokenizer, tmp_path):
    small_tok = bpe_tokenizer(CORPUS, 280)
    model = build_model(TINY, small_tok, seed=0)
    save_checkpoint(Checkpoint(model=model, tokenizer=tokenizer), tmp_path / "ckpt")
    assert len(tokenizer) > len(small_tok)
    with pytest.raises(ValueError, match=f"{len(tokenizer)} ids"):
        load_checkpoint(tmp_path / "ckpt")


def test_missing_config_names_folder(tmp_path):
    folder = tmp_path / "empty_ckpt"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_ckpt"):
        load_checkpoint(folder)
    with pytest.raises(FileNotFoundError, match="not_there"):
        load_checkpoint(tmp_path / "not_there")


def test_disable_dropout_turns_off_dropout_layers_and_attention_dropout():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.3))
    attention = torch.nn.Module()
    attention.attention_dropout = 0.2
    model.append(attention)
    assert disable_dropout(model) is model
    assert model[1].p == 0.0 and attention.attention_dropout == 0.0
    model.train()
    x = torch.ones(2, 4)
    assert torch.equal(model[:2](x), model[:2](x))  # no noise in train mode
