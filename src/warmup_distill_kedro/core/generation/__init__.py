"""Generation, shared by the probe, the teacher's corrections, on-policy KD and evaluation.

- `config.py`: `SamplingConfig` and `Generation`, what both backends take and return.
- `sampling.py`: `generate` / `generate_from_ids`, batched with the KV cache (the transformers backend).
- `vllm_backend.py`: the optional vLLM backend behind the same interface.
"""
