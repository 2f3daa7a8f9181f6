"""Models, tokenizers and the text -> tensor encoding every stage trains on.

- `modeling.py`: `Checkpoint` (a causal LM, its tokenizer and where it came from), building one from a
  config, saving and loading checkpoint folders.
- `tokenization.py`: byte-level BPE tokenizers trained locally, loading a tokenizer folder safely.
- `encoding.py`: (prompt, response) pairs -> padded tensors whose loss covers the response only.
"""
