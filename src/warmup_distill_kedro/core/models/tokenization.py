"""Tokenizers trained locally (no hub): byte-level BPE with every digit its own token.

Digits are split one by one so that numbers are spelled digit by digit, which tiny models learn
arithmetic from far more easily than from merged multi-digit tokens.

Pitfall this module exists to avoid: a tokenizer saved into a model folder whose config says `qwen2` is
loaded by `AutoTokenizer` as `Qwen2Tokenizer`, which rebuilds the pre-tokenizer and silently changes ids.
Our tokenizers therefore live in their own folder and are always loaded with `PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_BYTE_ALPHABET_SIZE = 256


class TokenizerConfig(BaseModel):
    """How to train one BPE tokenizer."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(512, ge=_BYTE_ALPHABET_SIZE + 8, description="total ids, specials included")
    min_frequency: int = Field(2, ge=1)


def train_bpe_tokenizer(texts: Iterable[str], config: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it for transformers."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tokenizer)


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> None:
    tokenizer.save_pretrained(str(folder))


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder without letting a model config change how it tokenizes.

    A folder with a `tokenizer.json` is loaded as the exact fast tokenizer it holds; anything else
    (a sentencepiece-only checkpoint, say) goes through `AutoTokenizer`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def eos_and_pad_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """EOS and padding ids; checkpoints without a pad token pad with EOS (masked out anyway)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no EOS token; generation could never stop"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer.eos_token_id, pad


def vocabulary_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the token -> id mapping: equal fingerprints mean an id names the same token."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]
