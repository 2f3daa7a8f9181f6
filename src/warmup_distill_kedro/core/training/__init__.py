"""The one training loop every training node uses (SFT, warmup, distillation), and what it is built of.

- `config.py`: `TrainingConfig`, the budget and optimisation settings.
- `batches.py`: position-addressed data sources (`ShuffledBatches`).
- `loop.py`: `TrainingRun`, the loop and its whole state.
- `state.py`: where the resumable state is saved; RNG streams.
- `parallel.py`: accelerate's processes, precision, sharding and gradient checkpointing.
"""
