"""The model size the generation tests share (sampling, checking, sharded generation, sampling backends)."""

from __future__ import annotations

from warmup_distill_kedro.core.models.modeling import ModelSize

# Untied: with tied embeddings a random tiny model greedily repeats one token, which hides position errors.
TINY_UNTIED = ModelSize(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=64,
    tie_word_embeddings=False,
)
