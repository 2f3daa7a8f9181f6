"""Models, tokenizers and the text -> tensor encoding every stage trains on.

- `modeling.py`: `Checkpoint` (a causal LM, its tokenizer and where it came from), building one from a
  config, saving and loading checkpoint folders.
- `tokenization.py`: byte-level BPE tokenizers trained locally, loading a tokenizer folder safely.
- `encoding.py`: (prompt, response) pairs -> padded tensors whose loss covers the response only.
- `sources.py`: real models published on the package index as GGUF files, fetched once and verified.
- `conversion.py`: a GGUF file or a Hugging Face folder -> a float32 checkpoint that saves like any other.
- `layers.py`: a student keeping some of the teacher's layers (`keep_layers`).
"""
