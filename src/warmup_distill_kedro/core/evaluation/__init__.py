"""Measuring a model the same way as every other.

- `generated.py`: scores of what the model generates (math exact match, Rouge-L, the teacher's verdict on
  its samples).
- `likelihood.py`: scores of gold responses under the model (NLL, entropy, KL to the teacher).
- `metrics.py`: Rouge-L and histograms, no model involved.
- `evaluate.py`: everything above for one model, as the evaluation JSON the report reads.
"""
