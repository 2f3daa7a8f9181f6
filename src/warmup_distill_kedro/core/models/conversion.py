"""A checkpoint from what a user has: a GGUF file (dequantized to float32) or a Hugging Face folder.

transformers reads GGUF files (with the `gguf` package) and dequantizes them, but a model it loaded that
way refuses `save_pretrained` (it is marked as quantized). `checkpoint_from_gguf` therefore rebuilds the
model from its config and loads the dequantized state dict into it: an ordinary float32 model that saves
as any other checkpoint. Every error names the file and the parameter that gave it, before any training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from warmup_distill_kedro.core.errors import UserInputError
from warmup_distill_kedro.core.models.modeling import (
    Checkpoint,
    check_tokenizer_fits,
    count_parameters,
    load_checkpoint,
)
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class AlreadyConverted:
    """What converting a source returns when the catalog already holds its checkpoint: nothing to save.

    A checkpoint dataset given this keeps its versions as they are (its latest stays the one converted
    before), so that a second run neither converts nor writes a copy of the same weights."""

    metadata: dict[str, Any]


def convert_once(source: dict[str, str], previous: dict[str, Any]) -> Checkpoint | AlreadyConverted:
    """`convert_source`, unless `previous` (the metadata of the latest saved conversion) is of the same file."""
    if previous.get("source_sha256") == source["sha256"]:
        return AlreadyConverted(previous)
    return convert_source(source)


def checkpoint_from_gguf(path: str | Path, parameter: str) -> Checkpoint:
    """The model and tokenizer of a GGUF file as a float32 checkpoint that can be saved."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{parameter}: GGUF file not found: {path}")
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise UserInputError(f"{parameter}: {path} is not a GGUF file (it does not start with 'GGUF')")
    folder, name = str(path.parent), path.name
    try:  # transformers refuses an architecture it has no mapping for with a ValueError
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError) as error:
        raise UserInputError(
            f"{parameter}: {path}: transformers cannot load this GGUF file: {error}"
        ) from error
    _require_causal_lm(config, f"{parameter}: {path}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = _rebuilt(loaded)
    del loaded
    check_tokenizer_fits(model, tokenizer, str(path))
    _set_generation_ids(model, tokenizer)
    return Checkpoint(model=model, tokenizer=tokenizer, metadata=_describe(model, source_file=str(path)))


def checkpoint_from_folder(path: str | Path, parameter: str) -> Checkpoint:
    """A local Hugging Face (or this project's) checkpoint folder, in float32, refused unless a causal LM."""
    path = Path(path)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise UserInputError(
            f"{parameter}: {path} {what}; give a Hugging Face checkpoint folder or a .gguf file"
        )
    _require_causal_lm(AutoConfig.from_pretrained(str(path)), f"{parameter}: {path}")
    checkpoint = load_checkpoint(path, dtype="float32")
    checkpoint.metadata = {
        **_describe(checkpoint.model, source_file=str(path)),
        "source_metadata": checkpoint.metadata,
    }
    return checkpoint


def _require_causal_lm(config: Any, origin: str) -> None:
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserInputError(
            f"{origin}: a '{config.model_type}' model is not a causal language model; give a decoder checkpoint "
            "(llama, qwen2, gemma3, ...)"
        )


def _rebuilt(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model built from the config alone, without the GGUF loader's quantization mark."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.generation_config = model.generation_config
    return rebuilt.eval()


def _set_generation_ids(model: PreTrainedModel, tokenizer: Any) -> None:
    eos_id, pad_id = eos_and_pad_ids(tokenizer)
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = eos_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = pad_id


def _describe(model: PreTrainedModel, source_file: str) -> dict[str, Any]:
    return {
        "stage": "checkpoints",
        "source_file": source_file,
        "model_type": model.config.model_type,
        "params": count_parameters(model),
        "dtype": "float32",
    }


def convert_source(source: dict[str, str]) -> Checkpoint:
    """The checkpoint a located source (`sources.locate_source`) describes, its provenance in the metadata."""
    if source["kind"] == "gguf":
        checkpoint = checkpoint_from_gguf(source["path"], source["parameter"])
    else:
        checkpoint = checkpoint_from_folder(source["path"], source["parameter"])
    provenance = {f"source_{key}": value for key, value in source.items() if key not in ("path", "parameter")}
    checkpoint.metadata.update(provenance)
    return checkpoint
