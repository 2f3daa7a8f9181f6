"""Warmup-Distill's steps before distillation (arXiv 2502.11766).

- `probe.py`: the student samples responses to the training prompts (its real distribution).
- `check.py`: the teacher scores every sampled token, flags what it gives low probability, corrects it.
- `corrected_set.py`: the rollout tables and the corrected set (chosen = corrected, rejected = original).
- `preference.py`: the warmup losses (DPO, DPO + NLL, SFT on the corrected responses).
- `warmup.py`: training the warmup student and its fairness control.
"""
