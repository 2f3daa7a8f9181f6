"""The distill loss from the last hidden states and the LM heads, chunk by chunk (as Liger-Kernel's fused
distillation losses do): neither model's full [positions, vocab] logits ever exist.

`distillation_loss` (kd_losses.py) takes both models' logits; at Qwen2.5's 152,064-token vocabulary
those are the largest tensors of a step (one [1024, 152064] float32 copy is 594 MiB, and the loss makes
several). `fused_distillation_loss` takes what the heads read instead, the last hidden states, plus the
heads' weights, and returns the same value and metrics: an autograd function walks the response
positions `chunk_size` at a time, computes that chunk's logits of both models (hidden @ W^T in the
head's dtype, as the model's own head would, then float32 for the loss), the chunk's CE and KD sums and,
at once, their gradient with respect to the chunk's logits; that gradient goes straight into the
gradients of the student's hidden states ([positions, hidden], small) and of its head (weight and bias,
accumulated over chunks), and the chunk's logits are freed. backward then hands out the precomputed
gradients. Each chunk's loss and gradient come from core.kd.chunked.chunk_loss, the same code as
distillation_loss's (every objective's closed form).

Only positions whose next label is a response token are visited (prompt and padding count in neither
term, as in distillation_loss). The peak holds one chunk's float32 [chunk_size, vocab] intermediates plus
the head's gradient, which training allocates anyway. With a low-precision head the weight gradient is
accumulated chunk by chunk in the head's dtype (as Liger-Kernel does), so it may differ from one
full-size matmul by that dtype's rounding.

The heads must be plain linear maps of the last hidden state (Qwen2, Llama, Mistral ...): a model that
post-processes its logits (soft-capping, scaling) is refused. `fused_model_distillation_loss` is the
same loss from two causal LMs and a batch (what the distill stage calls with `distill.fused_head`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional
from torch import Tensor
from torch.autograd.function import once_differentiable

from warmup_distill_kedro.core.kd.chunked import LossSpec, Scratch, chunk_loss, mixed_loss, release_or_copy
from warmup_distill_kedro.core.kd.losses import (
    KDConfig,
    common_vocab,
    distillation_metrics,
    distillation_spec,
    response_positions,
)


def _head(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Logits in the head's dtype (what the model's own lm_head computes), upcast to float32."""
    return torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()


class _FusedKD(torch.autograd.Function):
    """(1 - kd_rate) CE + kd_rate KD from hidden states and heads; see the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        teacher_bias: Tensor | None,
        positions: Tensor,
        targets: Tensor,
        spec: LossSpec,
        needs: tuple[bool, bool, bool],
    ) -> tuple[Tensor, Tensor, Tensor]:
        need_hidden, need_weight, need_bias = needs  # gradients for the hidden states, head weight, bias
        hidden_flat = hidden.reshape(-1, hidden.shape[-1])
        teacher_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        teacher_weight = teacher_weight[: spec.vocab]
        teacher_bias = None if teacher_bias is None else teacher_bias[: spec.vocab]
        n = positions.numel()
        grad_hidden = torch.zeros_like(hidden_flat) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias and bias is not None else None
        ce_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kd_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        scratch = Scratch(hidden.device)
        for start in range(0, n, spec.rows):
            index = positions[start : start + spec.rows]
            rows = hidden_flat[index].to(weight.dtype)
            logits = _head(rows, weight, bias)
            teacher_logits = _head(teacher_flat[index], teacher_weight, teacher_bias)
            ce_sum, kd_sum, grad = chunk_loss(
                logits, teacher_logits, targets[start : start + spec.rows], spec, n, scratch
            )
            del logits, teacher_logits
            ce_total += ce_sum
            kd_total += kd_sum
            if grad is None:
                continue
            grad = grad.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[index] = (grad @ weight).to(grad_hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad.T, rows)
            if grad_bias is not None:
                grad_bias += grad.sum(dim=0).to(grad_bias.dtype)
            del grad
        ctx.grad_hidden, ctx.grad_weight, ctx.grad_bias = grad_hidden, grad_weight, grad_bias
        ctx.hidden_shape = hidden.shape
        return mixed_loss(ctx, ce_total, kd_total, n, spec)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_loss: Tensor, _grad_ce: Tensor, _grad_kd: Tensor
    ) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_hidden = release_or_copy(ctx, "grad_hidden", grad_loss)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.view(ctx.hidden_shape)
        grad_weight = release_or_copy(ctx, "grad_weight", grad_loss)
        grad_bias = release_or_copy(ctx, "grad_bias", grad_loss)
        return (grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None)


def _check_head(name: str, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"{name} hidden states must be [batch, time, hidden], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{name} head weight must be [vocab, {hidden.shape[-1]}] for hidden size {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{name} head bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def fused_distillation_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor,
    labels: Tensor,
    config: KDConfig,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    student_head_bias: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
    ce: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """distillation_loss(student_hidden @ W_s^T, teacher_hidden @ W_t^T, labels, config, vocab_size),
    chunk by chunk, without either model's full logits.

    student_hidden [B, T, Hs] and the student head [V_s, Hs] (+ bias [V_s]) get gradients; the teacher's
    [B, T, Ht] and [V_t, Ht] are detached. Position t predicts labels[:, t + 1]; positions whose next
    label is IGNORE_INDEX count in neither term. CE is over the student's V_s columns; KD over the first
    vocab_size columns of both (without vocab_size, V_s and V_t must agree). chunk_size: positions per
    chunk, config.chunk_size when None (one of the two is required). Returns the loss (a float32 scalar)
    and the metrics loss, ce, kd, tokens.
    """
    chunk = config.chunk_size if chunk_size is None else chunk_size
    if chunk is None:
        raise ValueError(
            "fused_distillation_loss needs a chunk size: pass chunk_size or set config.chunk_size"
        )
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk!r}")
    _check_head("student", student_hidden, student_head_weight, student_head_bias)
    _check_head("teacher", teacher_hidden, teacher_head_weight, teacher_head_bias)
    if teacher_hidden.shape[:2] != student_hidden.shape[:2] or labels.shape != student_hidden.shape[:2]:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)}, teacher hidden {tuple(teacher_hidden.shape)} and "
            f"labels {tuple(labels.shape)} must share [batch, time]"
        )
    vocab = common_vocab(student_head_weight.shape[0], teacher_head_weight.shape[0], vocab_size)

    grad = torch.is_grad_enabled()
    needs = (
        grad and student_hidden.requires_grad,
        grad and student_head_weight.requires_grad,
        grad and student_head_bias is not None and student_head_bias.requires_grad,
    )
    positions, targets = response_positions(labels, student_hidden.device)
    spec = distillation_spec(config, vocab, chunk, any(needs), ce)
    loss, ce, kd = _FusedKD.apply(
        student_hidden,
        student_head_weight,
        student_head_bias,
        teacher_hidden.detach(),
        teacher_head_weight.detach(),
        None if teacher_head_bias is None else teacher_head_bias.detach(),
        positions,
        targets,
        spec,
        needs,
    )
    return loss, distillation_metrics(loss, ce, kd, positions)


# -- from causal LMs -----------------------------------------------------------------------------------------
def lm_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The output projection of a causal LM (under a DDP / DeepSpeed wrapper: of the model inside it)."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    config = getattr(inner, "config", None)
    post_processing = [
        name
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
        if getattr(config, name, None) not in (None, 1, 1.0)
    ]
    if not isinstance(head, torch.nn.Linear) or post_processing:
        raise ValueError(
            f"{type(inner).__name__}: the fused KD loss needs logits that are a plain linear map of the last "
            f"hidden state (head {type(head).__name__}{', ' + ', '.join(post_processing) if post_processing else ''}); "
            "compute the loss from the model's logits instead (distill.fused_head: false)"
        )
    return head


def last_hidden_state(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, T, H]: what the LM head reads at every position.

    The forward goes through `model` itself, so that whatever wraps it (DDP, accelerate's precision
    wrapper) sees it, but asks for the logits of the last position only (logits_to_keep=1); the decoder's
    output is read by a forward hook on `get_decoder()`.
    """
    inner = getattr(model, "module", model)
    captured: list[Tensor] = []
    handle = inner.get_decoder().register_forward_hook(lambda _m, _a, output: captured.append(output[0]))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"{type(inner).__name__}: its decoder ran {len(captured)} times in one forward")
    return captured[0]


def fused_model_distillation_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: dict[str, Tensor],
    config: KDConfig,
    vocab_size: int | None = None,
    ce: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """distillation_loss(student logits, teacher logits, batch["labels"], config, vocab_size, ce) for two
    causal LMs, from their last hidden states and heads (the teacher under no_grad), never with full logits."""
    with torch.no_grad():
        teacher_hidden = last_hidden_state(teacher, batch["input_ids"], batch["attention_mask"])
    hidden = last_hidden_state(student, batch["input_ids"], batch["attention_mask"])
    student_head, teacher_head = lm_head(student), lm_head(teacher)
    return fused_distillation_loss(
        hidden,
        student_head.weight,
        teacher_hidden,
        teacher_head.weight,
        batch["labels"],
        config,
        vocab_size=vocab_size,
        student_head_bias=student_head.bias,
        teacher_head_bias=teacher_head.bias,
        ce=ce,
    )
