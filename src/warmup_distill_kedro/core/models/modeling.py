"""Models built from transformers configs, and checkpoints as `save_pretrained` folders.

A checkpoint folder holds the model (`config.json` + safetensors), its tokenizer in a `tokenizer/`
sub-folder (see tokenization.py for why not at the top), and `checkpoint_meta.json` with what produced
it. A Hugging Face checkpoint downloaded elsewhere (tokenizer files at the top, no metadata) loads through
the same `load_checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids, load_tokenizer, save_tokenizer

TOKENIZER_SUBFOLDER = "tokenizer"
METADATA_FILE = "checkpoint_meta.json"
DType = Literal["float32", "bfloat16", "float16"]


class ModelSize(BaseModel):
    """A Qwen2-family decoder, sized by parameters."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(ge=8)
    num_hidden_layers: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int | None = Field(None, ge=1, description="defaults to num_attention_heads")
    intermediate_size: int = Field(ge=8)
    max_position_embeddings: int = Field(256, ge=16)
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSize:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_attention_heads {self.num_attention_heads}"
            )
        kv = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kv:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of num_key_value_heads {kv}"
            )
        return self


@dataclass
class Checkpoint:
    """A causal LM with the tokenizer it was trained with, and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    metadata: dict[str, Any] = field(default_factory=dict)


def build_model(size: ModelSize, tokenizer: PreTrainedTokenizerBase, seed: int) -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2 causal LM whose vocabulary is exactly the tokenizer's."""
    eos_id, pad_id = eos_and_pad_ids(tokenizer)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads or size.num_attention_heads,
        intermediate_size=size.intermediate_size,
        max_position_embeddings=size.max_position_embeddings,
        tie_word_embeddings=size.tie_word_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    return model


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Turn every dropout of `model` off, in train mode too: `nn.Dropout` layers and the attention dropout
    transformers' attention modules read from their `attention_dropout` attribute. What TRL's preference
    trainers do by default: a policy compared with a reference must not differ from it by dropout noise."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


@torch.no_grad()
def weights_digest(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """A checksum of every weight tensor from an evenly strided sample of its values: cheap even for a 7B
    model on its device, and different for any two trainings in practice."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // samples_per_tensor)].float().cpu()
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_tokenizer_fits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, origin: str) -> None:
    """Refuse a tokenizer whose ids the model has no embedding rows for.

    A model may have more rows than the tokenizer has ids (Qwen2.5 pads 151665 ids to 151936 rows);
    the reverse would index past the embedding table, or silently pair the model with another tokenizer.
    """
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"{origin}: the tokenizer has {len(tokenizer)} ids but the model's embedding has only {rows} rows; "
            "this tokenizer does not belong to this model"
        )


def save_checkpoint(checkpoint: Checkpoint, folder: str | Path) -> None:
    folder = Path(folder)
    checkpoint.model.save_pretrained(str(folder))
    save_tokenizer(checkpoint.tokenizer, folder / TOKENIZER_SUBFOLDER)
    (folder / METADATA_FILE).write_text(
        json.dumps(checkpoint.metadata, indent=2, sort_keys=True, default=str)
    )


def load_checkpoint(folder: str | Path, dtype: DType = "float32") -> Checkpoint:
    """Load one of our checkpoints or a local Hugging Face checkpoint folder, by the same path."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a checkpoint folder (no config.json)")
    tokenizer_folder = folder / TOKENIZER_SUBFOLDER
    tokenizer = load_tokenizer(tokenizer_folder if tokenizer_folder.is_dir() else folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype))
    check_tokenizer_fits(model, tokenizer, str(folder))
    eos_id, pad_id = eos_and_pad_ids(tokenizer)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = pad_id
    meta_file = folder / METADATA_FILE
    metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {"source": str(folder)}
    return Checkpoint(model=model, tokenizer=tokenizer, metadata=metadata)
