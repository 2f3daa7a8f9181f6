"""The KD losses training uses: masked means of a divergence over response positions.

`kd_loss` averages a divergence (core.kd.divergences) over the masked-in positions, chunk by chunk where
core.kd.chunked has a path for it, so that the full [positions, vocab] float32 distributions of both
models never exist at once; `distillation_loss` mixes it with the student's cross-entropy on the gold
response: (1 - kd_rate) CE + kd_rate KD. KDConfig is the distill stage's parameter block for both.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from warmup_distill_kedro.core.kd.chunked import ChunkedLoss, LossSpec, chunk_rows
from warmup_distill_kedro.core.kd.config import KDSettings
from warmup_distill_kedro.core.kd.divergences import (
    OBJECTIVES,
    check_temperature,
    unknown_objective,
    validate_options,
)
from warmup_distill_kedro.core.kd.sinkhorn import sinkhorn_loss
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX


# -- the masked mean ------------------------------------------------------------------------------------------
def common_vocab(student_size: int, teacher_size: int, vocab_size: int | None) -> int:
    if vocab_size is None:
        if student_size != teacher_size:
            raise ValueError(
                f"student logits have {student_size} vocabulary columns but teacher logits have {teacher_size}: pass vocab_size (the tokenizer's real size) to drop the padding rows, once both tokenizers are known to be the same (equal vocabulary_fingerprint)"
            )
        return student_size
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if vocab_size > min(student_size, teacher_size):
        raise ValueError(
            f"vocab_size {vocab_size} exceeds the logits: student has {student_size} columns, teacher {teacher_size}"
        )
    return vocab_size


def kd_loss(
    objective: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    **options: Any,
) -> Tensor:
    """Mean divergence over the masked-in positions: logits [..., V] (e.g. [B, T, V]), mask [...] bool.

    Returns a float32 scalar; 0.0 (still connected to the student's graph) when no position is masked in.
    The teacher gets no gradient: teacher_logits is detached here, whatever its requires_grad.
    vocab_size keeps only the first vocab_size columns of both (padding rows that one model has and the
    tokenizer never produces, e.g. Qwen2.5 151936 vs 152064); without it the vocabulary sizes must agree.
    The positions are walked a chunk at a time, with the value and gradient of the whole computation and
    a peak memory of one chunk's float32 intermediates instead of the full [n_positions, V] ones of both
    models (core.kd.chunked.ChunkedLoss: each objective's value and gradient in closed form, chunk by
    chunk). chunk_size caps the positions per chunk; None sizes chunks for the device
    (chunk_rows: on a CPU, small enough to stay in the caches, which is also several times faster).
    `kd_loss("sinkhorn", ...)` is the Sinkhorn distance of core.kd.sinkhorn instead (a distance between the
    sets of positions, not a mean over them; options epsilon, iters, block).
    """
    if objective == "sinkhorn":
        _check_positions(student_logits, teacher_logits, mask)
        vocab = common_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
        return sinkhorn_loss(
            student_logits, teacher_logits, mask, check_temperature(temperature), vocab, **options
        )
    resolved = validate_options(objective, **options)
    temperature = check_temperature(temperature)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    _check_positions(student_logits, teacher_logits, mask)
    vocab = common_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)

    teacher_flat = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    student_flat = student_logits.reshape(-1, student_logits.shape[-1])
    positions = mask.reshape(-1).to(student_flat.device).nonzero().squeeze(1)
    if positions.numel() == 0:
        return student_flat[:0].float().sum()  # 0.0 with the graph intact
    spec = LossSpec(
        objective=objective,
        options=resolved,
        temperature=temperature,
        vocab=vocab,
        rows=chunk_rows(student_flat.shape[1], student_flat.device, chunk_size),
        ce_weight=0.0,
        kd_weight=1.0,
        need_grad=torch.is_grad_enabled() and student_logits.requires_grad,
    )
    loss, _, _ = ChunkedLoss.apply(student_flat, teacher_flat, positions, None, spec)
    return loss


def _check_positions(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> None:
    if student_logits.dim() < 1 or student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} must share their leading (position) dims"
        )
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"mask {tuple(mask.shape)} must match the logits' positions {tuple(student_logits.shape[:-1])}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")


# -- the distill stage's loss -------------------------------------------------------------------------------
class KDConfig(KDSettings):
    """One token-level objective with its options, and the shared KD settings: what `distillation_loss`
    computes."""

    objective: str = Field("fkl", description=f"one of {', '.join(OBJECTIVES)}")
    options: dict[str, float | bool | str] = Field(
        default_factory=dict,
        description="the objective's options (js: beta, normalized; skl/srkl: alpha; akl: mu, crossing; dpkd: beta, label_smoothing)",
    )

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, value: str) -> str:
        if value not in OBJECTIVES:
            raise ValueError(unknown_objective(value))
        return value

    @model_validator(mode="after")
    def _valid_options(self) -> KDConfig:
        self.options = validate_options(self.objective, **self.options)
        return self


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    config: KDConfig,
    vocab_size: int | None = None,
    ce: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """(1 - kd_rate) CE(student, labels) + kd_rate KD over the response positions, with metrics.

    `ce=False` (labels the student sampled itself, which it must not be trained to imitate): kd_rate KD
    alone, CE still computed for its metric.

    logits [B, T, V] at position t predict labels[:, t+1]; positions whose next label is IGNORE_INDEX
    (prompt, padding) count in neither term. CE is the token mean over the student's full vocabulary,
    as in causal_lm_loss; KD is kd_loss with the config's objective, temperature, options and chunk size.
    A term whose weight is 0 is computed for its metric only, without a graph.
    Metrics: loss, ce, kd, tokens (the number of response positions).
    Both terms, their values and the student's gradient come from one chunked pass over the response
    positions (core.kd.chunked.ChunkedLoss).
    """
    if student_logits.dim() != 3 or student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} must be [batch, time, vocab] with the same batch and time"
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match the logits' positions {tuple(student_logits.shape[:-1])}"
        )
    vocab = common_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    student_flat = student_logits.reshape(-1, student_logits.shape[-1])
    teacher_flat = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    positions, targets = response_positions(labels, student_flat.device)
    rows = chunk_rows(student_flat.shape[1], student_flat.device, config.chunk_size)
    spec = distillation_spec(
        config, vocab, rows, torch.is_grad_enabled() and student_logits.requires_grad, ce
    )
    loss, ce_mean, kd_mean = ChunkedLoss.apply(student_flat, teacher_flat, positions, targets, spec)
    return loss, distillation_metrics(loss, ce_mean, kd_mean, positions)


def response_positions(labels: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """The flat positions [B * T] whose next label is a response token, and those next labels.

    Position t predicts labels[:, t + 1]; the last position predicts nothing; IGNORE_INDEX (prompt,
    padding) counts in neither term of the loss.
    """
    next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1).to(device)
    positions = (next_labels != IGNORE_INDEX).nonzero().squeeze(1)
    return positions, next_labels[positions]


def distillation_spec(config: KDConfig, vocab: int, rows: int, need_grad: bool, ce: bool = True) -> LossSpec:
    """The chunked loss's spec for the distill stage's (1 - kd_rate) CE + kd_rate KD (without the CE term
    when `ce` is False)."""
    return LossSpec(
        objective=config.objective,
        options=config.options,
        temperature=float(config.temperature),
        vocab=vocab,
        rows=rows,
        ce_weight=1.0 - config.kd_rate if ce else 0.0,
        kd_weight=float(config.kd_rate),
        need_grad=need_grad,
    )


def distillation_metrics(loss: Tensor, ce: Tensor, kd: Tensor, positions: Tensor) -> dict[str, float]:
    return {"loss": loss.item(), "ce": ce.item(), "kd": kd.item(), "tokens": float(positions.numel())}
