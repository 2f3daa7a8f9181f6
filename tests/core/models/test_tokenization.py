"""core/models/tokenization.py: locally trained byte-level BPE tokenizers: digit splitting, lossless round
trips, save/load stability."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from tests.helpers import TINY, bpe_tokenizer, token_ids
from warmup_distill_kedro.core.models.tokenization import (
    EOS_TOKEN,
    PAD_TOKEN,
    TokenizerConfig,
    eos_and_pad_ids,
    load_tokenizer,
    save_tokenizer,
)

torch.set_num_threads(1)

CORPUS = [
    "Question: what is 12 plus 345?\nAnswer: 12 + 345 = 357\n#### 357",
    "The cat sat on the mat. It's a sunny day, isn't it?",
    "Héllo wörld! Ça va? 日本語のテキスト.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
] * 10

SAMPLES = [
    "Question: 7 * 8 = ?\nAnswer: 56\n#### 56",
    "a\nb\n\n  c\t(tab), punctuation: !?;:'\"-[]{}",
    "Héllo, wörld! 日本 🎉 naïve café",
    "  leading and trailing spaces  ",
    "words never seen: zyxwvut qqq 9876543210",
]


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(CORPUS)


def test_vocabulary_size_and_specials(tokenizer):
    assert len(tokenizer) == 300
    eos_id, pad_id = eos_and_pad_ids(tokenizer)
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token == PAD_TOKEN
    assert eos_id is not None and pad_id is not None
    assert eos_id != pad_id
    assert tokenizer.convert_ids_to_tokens([eos_id, pad_id]) == [EOS_TOKEN, PAD_TOKEN]


def test_digits_are_single_tokens(tokenizer):
    # "12" and "345" occur in the corpus many times: without digit splitting BPE would merge them.
    tokens = tokenizer.convert_ids_to_tokens(token_ids(tokenizer, "12345"))
    assert tokens == ["1", "2", "3", "4", "5"]
    tokens = tokenizer.convert_ids_to_tokens(token_ids(tokenizer, "is 357"))
    digits = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digits == ["3", "5", "7"]
    for digit in "0123456789":
        assert len(token_ids(tokenizer, digit)) == 1


def test_common_words_are_merged(tokenizer):
    # Training did learn merges (otherwise everything would be bytes and the digit test would be vacuous).
    assert len(token_ids(tokenizer, "Question")) < len("Question")


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_encode_round_trip(tokenizer, text):
    assert tokenizer.decode(token_ids(tokenizer, text)) == text


def test_save_load_round_trip_keeps_ids(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert len(loaded) == len(tokenizer)
    assert eos_and_pad_ids(loaded) == eos_and_pad_ids(tokenizer)
    for text in SAMPLES:
        assert token_ids(loaded, text) == token_ids(tokenizer, text)
        assert loaded.decode(token_ids(loaded, text)) == text


def test_tokenizer_next_to_qwen2_config_keeps_ids(tokenizer, tmp_path):
    """The pitfall: a qwen2 config.json in the same folder must not change how the tokenizer splits."""
    from warmup_distill_kedro.core.models.modeling import build_model

    model = build_model(TINY, tokenizer, seed=0)
    folder = tmp_path / "hf"
    model.save_pretrained(str(folder))
    save_tokenizer(tokenizer, folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2"

    loaded = load_tokenizer(folder)
    assert len(loaded) == len(tokenizer)
    assert eos_and_pad_ids(loaded) == eos_and_pad_ids(tokenizer)
    for text in [*SAMPLES, "12345", " 12345", "x 12,345.67"]:
        assert token_ids(loaded, text) == token_ids(tokenizer, text), text
        assert loaded.decode(token_ids(loaded, text)) == text


def test_load_tokenizer_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def test_eos_and_pad_ids_falls_back_to_eos_for_padding(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path / "tok")
    no_pad = load_tokenizer(tmp_path / "tok")
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    eos_id, pad_id = eos_and_pad_ids(no_pad)
    assert pad_id == eos_id == tokenizer.eos_token_id


def test_vocab_size_too_small_is_refused():
    with pytest.raises(ValidationError, match="vocab_size"):
        TokenizerConfig(vocab_size=10)


def test_unknown_config_key_is_refused():
    with pytest.raises(ValidationError, match="vocab_sise"):
        TokenizerConfig(vocab_sise=300)
