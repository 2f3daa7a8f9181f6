"""Knowledge distillation: the divergences, the losses built from them, and one grid cell's training.

- `divergences.py`: the per-position formulas (fkl, rkl, js, tvd, skl, srkl, akl) and their options.
- `losses.py`: `kd_loss` and `distillation_loss`, masked means over response positions; `KDConfig`.
- `chunked.py`: the chunked autograd Function with every objective's gradient in closed form.
- `fused.py`: the loss from the last hidden states and LM heads, never the full logits.
- `dual_space.py`: DSKD and DSKD-CMA (projectors, cross-model attention).
- `data.py`: where the KD sequences come from (off-policy, on-policy, adaptive, sequence-level KD).
- `cell.py`: one cell of the distill grid, from a teacher, a student and the KD set to a trained student.
"""
