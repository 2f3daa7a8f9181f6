"""The chunked KD loss: an autograd Function that walks the positions a chunk at a time with the
student's gradient precomputed, so that the full [positions, vocab] float32 distributions of both models
never exist at once.

ChunkedLoss computes ce_weight CE + kd_weight KD. Each chunk's values and gradient come in closed form,
for every objective (the gradient w.r.t. the student logits is q (g - <q, g>) / T, with g the
objective's derivative in q), in one pass over float32 scratch tensors that every chunk reuses: the
leanest in memory, and several times faster than autograd through the per-position formulas of
core.kd.divergences on a CPU. A chunk with a -inf student logit goes through that autograd instead. The
precomputed gradient buffer is handed to autograd instead of being copied (release_or_copy);
core.kd.fused reuses chunk_loss for its chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from warmup_distill_kedro.core.kd.divergences import (
    LOG_FLOOR,
    MIX_CLAMP,
    gap_shares,
    head_floor,
    reduced_objective,
    resolved_divergence,
)


# -- handing a precomputed gradient to autograd -------------------------------------------------------------
def _keeps_graph() -> bool:
    """Whether the running backward was asked to keep the graph (retain_graph=True); True if unknown."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else bool(keep_graph())


_RELEASED = "released"  # what a ctx holds in place of a gradient buffer that a backward handed over


def release_or_copy(ctx: Any, name: str, grad_output: Tensor) -> Tensor | None:
    """The precomputed gradient `ctx.<name>` times grad_output, for a backward of a chunked Function.

    A backward that frees the graph (the usual one) gets the buffer itself, scaled in place, and the ctx
    lets go of it: no second full-size tensor is allocated (autograd then adopts it as .grad of a leaf),
    and the memory is not held until the loss tensor dies. A second backward then raises, as autograd
    does for a freed graph. With retain_graph=True, a scaled copy, so that the buffer stays intact.
    """
    buffer = getattr(ctx, name)
    if buffer is None:
        return None
    if isinstance(buffer, str):
        raise RuntimeError(
            "Trying to backward through a chunked loss a second time: its precomputed gradient was handed "
            "over by the first backward. Pass retain_graph=True to the first one, or compute the loss again."
        )
    scale = grad_output.to(buffer.dtype)
    if _keeps_graph():
        return buffer * scale
    setattr(ctx, name, _RELEASED)
    if not bool(grad_output == 1):
        buffer.mul_(scale)
    return buffer


# -- closed forms: value and student gradient in one chunked pass, CE folded in -------------------------------
# Default float32 elements per [rows, vocab] scratch tensor of one chunk, by device type. On a CPU a chunk's
# few scratch tensors stay in the caches and are reused chunk after chunk (fresh full-size allocations cost
# page faults there, more than the arithmetic); a GPU wants few, large kernels.
_CHUNK_ELEMENTS: dict[str, int] = {"cpu": 1 << 21, "cuda": 1 << 26}


def chunk_rows(width: int, device: torch.device, chunk_size: int | None) -> int:
    """Positions per chunk: the device's default, capped by chunk_size when given."""
    rows = max(1, _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cuda"]) // width)
    return rows if chunk_size is None else min(rows, chunk_size)


class Scratch:
    """[rows, width] scratch tensors by name (float32 unless asked), allocated once and reused chunk after chunk."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[str, Tensor] = {}

    def __call__(self, name: str, rows: int, width: int, dtype: torch.dtype = torch.float32) -> Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != width or buffer.dtype != dtype:
            buffer = torch.empty(rows, width, dtype=dtype, device=self.device)
            self.buffers[name] = buffer
        return buffer[:rows]


def _row_sum_of_product(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """sum(a * b) along the last dim of two [c, V] tensors, as [c, 1], the product written into `out`."""
    return torch.mul(a, b, out=out).sum(dim=-1, keepdim=True)


def _mix_log_ratios_(log_ratio: Tensor, p_weight: float, out: Tensor) -> tuple[Tensor, Tensor]:
    """divergences.mix_log_ratios by the same operations, in place: (log(m / q), log(m / p)) for
    m = p_weight p + (1 - p_weight) q, from log_ratio = log p - log q. One of the two is written into `out`,
    the other over log_ratio."""
    if p_weight <= 0.5:
        r = log_ratio.clamp_(max=MIX_CLAMP)
        log_m_q = torch.expm1(r, out=out).mul_(p_weight).log1p_()
        return log_m_q, torch.sub(log_m_q, r, out=r)
    r = log_ratio.clamp_(min=-MIX_CLAMP)
    log_m_p = torch.neg(r, out=out).expm1_().mul_(1.0 - p_weight).log1p_()
    return torch.add(log_m_p, r, out=r), log_m_p


@dataclass(frozen=True)
class _KDTerms:
    """A chunk's KD per row [c, 1] and T times its gradient w.r.t. the student logits,
        q * q_num / q_sum + h * h_num / h_den,
    with q the student's unnormalized exponentials (softmax = q / q_sum). In terms of the loss's derivative
    g = dL/dq (q normalized), that gradient is q * g - q <q, g>: h * h_num / h_den is q * g and q_num is
    -<q, g>."""

    rows: Tensor
    q_num: Tensor | float
    h: Tensor
    h_num: Tensor | float
    h_den: Tensor | float


def _kd_terms(
    objective: str,
    options: dict[str, Any],
    x: Tensor,
    q: Tensor,
    q_sum: Tensor,
    y: Tensor,
    p: Tensor,
    p_sum: Tensor,
    scratch: Scratch,
) -> _KDTerms:
    """The KD terms of a chunk (see _closed_form_chunk for x, q, y, p; x and y may be overwritten, q and p
    are not). Mixtures m use _mix_log_ratios_: lmp = log(m / p), lmq = log(m / q); dL/dq (up to a constant,
    which the gradient's centring removes):
        skl   KL(p || alpha p + (1-alpha) q)       -(1-alpha) p / m      (q g = -(1-alpha) q exp(-lmp))
        srkl  KL(q || (1-alpha) p + alpha q)       -lmq - alpha exp(-lmq)
        js    beta KL(p||m) + (1-beta) KL(q||m)    -(1-beta) lmq         (normalized: / beta (1-beta))
        tvd   1/2 sum |p - q|                      1/2 sign(q - p)
        akl   w_head fkl + w_tail rkl              -w_head p / q + w_tail (log q - log p)   (weights held fixed)
        dpkd  DPO on (teacher's top, student's top) q g = dL/dh (e_chosen - e_rejected): not of the centred
              form (the log-normalizers cancel in h); q_num 0
    skl and srkl at alpha 0 are fkl and rkl, normalized js at beta 0 and 1 too (reduced_objective).
    """
    rows, vocab = q.shape
    log_q_sum, log_p_sum = q_sum.log(), p_sum.log()
    objective = reduced_objective(objective, options)
    if objective == "fkl":  # sum p (y - x) / p_sum - (ly - lx);  q g = -p
        kd_rows = y.sub_(x).mul_(p).sum(dim=-1, keepdim=True) / p_sum - (log_p_sum - log_q_sum)
        return _KDTerms(kd_rows, 1.0, p, -1.0, p_sum)
    if objective == "rkl":  # sum q (x - y) / q_sum + (ly - lx);  q g = q (log q - log p)
        w = torch.sub(x, y, out=y).mul_(q)
        w_mean = w.sum(dim=-1, keepdim=True) / q_sum
        return _KDTerms(w_mean + (log_p_sum - log_q_sum), -w_mean, w, 1.0, q_sum)
    product = scratch("product", rows, vocab)
    if objective == "tvd":
        diff = torch.mul(q, 1.0 / q_sum, out=scratch("ratio", rows, vocab)).addcmul_(p, -1.0 / p_sum)  # q - p
        kd_rows = 0.5 * torch.abs(diff, out=product).sum(dim=-1, keepdim=True)
        h = torch.sign(diff, out=product).mul_(q)
        return _KDTerms(kd_rows, -0.5 * h.sum(dim=-1, keepdim=True) / q_sum, h, 0.5, q_sum)
    if objective == "dpkd":  # from x and y directly: the log-normalizers cancel in each difference
        chosen, rejected = y.argmax(dim=-1, keepdim=True), x.argmax(dim=-1, keepdim=True)
        margin = (x.gather(1, chosen) - x.gather(1, rejected)) - (y.gather(1, chosen) - y.gather(1, rejected))
        beta, smoothing = options["beta"], options["label_smoothing"]
        kd_rows = -(1.0 - smoothing) * torch.nn.functional.logsigmoid(beta * margin)
        kd_rows -= smoothing * torch.nn.functional.logsigmoid(-beta * margin)
        # dL/dh, on the chosen logit and against the rejected one (nothing where they are the same token)
        slope = beta * (
            smoothing * torch.sigmoid(beta * margin) - (1.0 - smoothing) * torch.sigmoid(-beta * margin)
        )
        h = product.zero_().scatter_add_(1, chosen, slope).scatter_add_(1, rejected, -slope)
        return _KDTerms(kd_rows, 0.0, h, 1.0, torch.ones_like(q_sum))

    log_q, log_p = x.sub_(log_q_sum), y.sub_(log_p_sum)
    ratio, mix = scratch("ratio", rows, vocab), scratch("mix", rows, vocab)
    if objective == "skl":  # m = alpha p + (1 - alpha) q
        alpha = options["alpha"]
        _, log_m_p = _mix_log_ratios_(torch.sub(log_p, log_q, out=ratio), alpha, mix)
        kd_rows = -_row_sum_of_product(p, log_m_p, product) / p_sum
        # q (p / m - 1), unnormalized: the -1 drops out of the centred gradient and keeps p / m's precision
        h = log_m_p.neg_().expm1_().mul_(q)
        return _KDTerms(kd_rows, (1.0 - alpha) * h.sum(dim=-1, keepdim=True) / q_sum, h, alpha - 1.0, q_sum)
    if objective == "srkl":  # m = (1 - alpha) p + alpha q
        alpha = options["alpha"]
        log_m_q, log_m_p = _mix_log_ratios_(torch.sub(log_p, log_q, out=ratio), 1.0 - alpha, mix)
        kd_rows = -_row_sum_of_product(q, log_m_q, product) / q_sum
        # q (lmq + alpha (q / m - 1)), as for skl
        h = torch.neg(log_m_q, out=log_m_p).expm1_().mul_(alpha).add_(log_m_q).mul_(q)
        return _KDTerms(kd_rows, h.sum(dim=-1, keepdim=True) / q_sum, h, -1.0, q_sum)
    if objective == "js":  # m = beta p + (1 - beta) q
        beta, normalized = options["beta"], options["normalized"]
        log_m_q, log_m_p = _mix_log_ratios_(torch.sub(log_p, log_q, out=ratio), beta, mix)
        kl_p_m = -_row_sum_of_product(p, log_m_p, product) / p_sum
        h = log_m_q.mul_(q)
        kl_q_m = -h.sum(dim=-1, keepdim=True) / q_sum
        if normalized:
            return _KDTerms(kl_p_m / (1.0 - beta) + kl_q_m / beta, -kl_q_m / beta, h, -1.0 / beta, q_sum)
        return _KDTerms(beta * kl_p_m + (1.0 - beta) * kl_q_m, -(1.0 - beta) * kl_q_m, h, beta - 1.0, q_sum)
    if objective == "akl":
        above = scratch("above", rows, vocab)
        head = torch.gt(p, head_floor(p, options["mu"] * p_sum, above, options["crossing"]), out=above)
        gap = torch.mul(q, 1.0 / q_sum, out=product).addcmul_(p, -1.0 / p_sum).abs_()
        w_head, w_tail = (w.unsqueeze(1) for w in gap_shares(gap, head))
        log_ratio = torch.sub(log_q, log_p, out=ratio)  # log q - log p
        fkl_rows = -_row_sum_of_product(p, log_ratio, product) / p_sum
        rkl_rows = _row_sum_of_product(q, log_ratio, product) / q_sum
        h = log_ratio.mul_(q).mul_(w_tail).addcmul_(p, -w_head * q_sum / p_sum)  # q_sum q g
        return _KDTerms(w_head * fkl_rows + w_tail * rkl_rows, w_head - w_tail * rkl_rows, h, 1.0, q_sum)
    raise ValueError(f"no closed form for KD objective {objective!r}")


def _closed_form_chunk(
    student: Tensor,
    teacher: Tensor,
    targets: Tensor | None,
    spec: LossSpec,
    ce_scale: float,
    kd_scale: float,
    scratch: Scratch,
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """CE and KD sums of a chunk and the gradient of ce_scale * CE + kd_scale * KD w.r.t. its student rows.

    student: float32 [c, W] logits (CE uses all W columns, KD the first V); teacher: float32 [c, V]. Both
    are overwritten. With x = (s - max s) / T, y = (t - max t) / T, lx, ly their log-sum-exps, and
    q = softmax(x), p = softmax(y) (log q = x - lx, log p = y - ly), KD's gradient is
        d KD / ds = q * (g - <q, g>) / T,   g = d KD / dq   (_kd_terms, per objective)
    and CE's, lse(s) - s_target, is softmax(s) - onehot(target). CE's exponentials exp(s - max s) are q's
    own at T = 1 and their squares at T = 2 (when W = V): no second exp pass. Teacher log-probabilities are
    floored at LOG_FLOOR as in _log_probs (a zero teacher probability contributes 0); a student row that
    reaches the floor (a -inf logit) returns None, and the caller takes the autograd path, whose gradient
    through the floor's clamp differs from the closed form. The gradient is [c, W], or [c, V] when it has no
    CE part; it may be one of the scratch tensors.
    """
    rows, vocab = teacher.shape
    width = student.shape[1]
    temperature = spec.temperature
    inv_t = 1.0 / temperature
    head = student[:, :vocab]
    x_max = head.amax(dim=-1, keepdim=True)
    x = torch.add(x_max * -inv_t, head, alpha=inv_t, out=scratch("x", rows, vocab))  # (s - max s) / T
    if bool(x.amin() < LOG_FLOOR):
        return None
    q = torch.exp(x, out=scratch("q", rows, vocab))  # unnormalized: softmax = q / q_sum
    q_sum = q.sum(dim=-1, keepdim=True)
    y = torch.add(teacher.amax(dim=-1, keepdim=True) * -inv_t, teacher, alpha=inv_t, out=teacher)
    y.clamp_(min=LOG_FLOOR)
    p = torch.exp(y, out=scratch("p", rows, vocab))
    p_sum = p.sum(dim=-1, keepdim=True)

    ce_sum = torch.zeros((), dtype=torch.float32, device=student.device)
    ce_exp: Tensor | None = None  # exp(s - max s) over all W columns, when q does not carry it
    ce_exp_sum = q_sum
    if targets is not None:
        target_logits = student.gather(1, targets.unsqueeze(1))
        ce_max = x_max
        if width != vocab or temperature not in (1.0, 2.0):
            ce_max = student.amax(dim=-1, keepdim=True)
            ce_exp = torch.sub(student, ce_max, out=student).exp_()
            ce_exp_sum = ce_exp.sum(dim=-1, keepdim=True)
        elif temperature == 2.0:  # exp(s - max s) = q^2
            ce_exp_sum = torch.linalg.vector_norm(q, dim=-1, keepdim=True).square()
        ce_sum = (ce_max + ce_exp_sum.log() - target_logits).sum()

    kd = _kd_terms(spec.objective, spec.options, x, q, q_sum, y, p, p_sum, scratch)
    kd_sum = kd.rows.sum()
    if not spec.need_grad:
        return ce_sum, kd_sum, None

    g = kd_scale * inv_t
    a = ce_scale if targets is not None else 0.0
    if g == 0.0:  # the CE gradient alone
        if ce_exp is not None:
            grad = ce_exp.mul_(a / ce_exp_sum)
        elif temperature == 2.0:
            grad = torch.mul(q, a / ce_exp_sum, out=x).mul_(q)
        else:
            grad = q.mul_(a / q_sum)
    elif ce_exp is not None:  # CE's own exponentials, in the student's rows: add the KD gradient to them
        grad = ce_exp.mul_(a / ce_exp_sum)
        grad[:, :vocab].addcmul_(q, g * kd.q_num / q_sum).addcmul_(kd.h, g * kd.h_num / kd.h_den)
    elif a != 0.0 and temperature == 2.0:  # + a q^2 / sum(q^2)
        grad = torch.addcmul(g * kd.q_num / q_sum, q, a / ce_exp_sum, out=x).mul_(q)
        grad.addcmul_(kd.h, g * kd.h_num / kd.h_den)
    else:  # no CE gradient, or T = 1: + a q / q_sum
        grad = q.mul_((g * kd.q_num + a) / q_sum).addcmul_(kd.h, g * kd.h_num / kd.h_den)
    if a != 0.0:
        grad.scatter_add_(1, targets.unsqueeze(1), grad.new_full((rows, 1), -a))  # type: ignore[union-attr]
    return ce_sum, kd_sum, grad


def _autograd_chunk(
    student: Tensor, teacher: Tensor, targets: Tensor | None, spec: LossSpec, ce_scale: float, kd_scale: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """What _closed_form_chunk returns, by differentiating _divergence (and the log-softmax) with autograd."""
    need_grad = spec.need_grad
    student = student.detach().requires_grad_(need_grad)
    ce_sum = torch.zeros((), dtype=torch.float32, device=student.device)
    if targets is not None:
        with torch.set_grad_enabled(need_grad and ce_scale > 0.0):
            log_q = torch.log_softmax(student, dim=-1)  # the student's full width, no temperature
            ce_sum = -log_q.gather(1, targets.unsqueeze(1)).sum()
            del log_q
    with torch.set_grad_enabled(need_grad and kd_scale > 0.0):
        head = student[:, : teacher.shape[1]]
        kd_sum = resolved_divergence(spec.objective, head, teacher, spec.temperature, spec.options).sum()
    if not need_grad:
        return ce_sum, kd_sum, None
    with torch.enable_grad():
        share = [
            term * scale for term, scale in ((ce_sum, ce_scale), (kd_sum, kd_scale)) if term.requires_grad
        ]
        grad = torch.autograd.grad(sum(share), student)[0] if share else torch.zeros_like(student)
    return ce_sum.detach(), kd_sum.detach(), grad


@dataclass(frozen=True)
class LossSpec:
    """What a chunked loss needs besides tensors (ChunkedLoss, and core.kd.fused with its own chunks)."""

    objective: str
    options: dict[str, Any]
    temperature: float
    vocab: int  # KD compares the first `vocab` columns; CE uses the student's full width
    rows: int  # positions per chunk
    ce_weight: float
    kd_weight: float
    need_grad: bool


def chunk_loss(
    student: Tensor, teacher: Tensor, targets: Tensor | None, spec: LossSpec, n: int, scratch: Scratch
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One chunk's CE sum (0 without targets), KD sum and the gradient of its share of the loss,
    (ce_weight CE + kd_weight KD) / n over the n positions of the whole loss, w.r.t. its float32 student
    rows [c, W] (None without spec.need_grad; [c, V] when it has no CE part).

    The closed form, or autograd where it does not apply (a -inf student logit); student [c, W] and teacher
    [c, V] are float32 and may be overwritten. CE is over all W columns at temperature 1, KD over the first V.
    """
    ce_scale, kd_scale = spec.ce_weight / max(n, 1), spec.kd_weight / max(n, 1)
    result = _closed_form_chunk(student, teacher, targets, spec, ce_scale, kd_scale, scratch)
    if result is None:  # a -inf student logit
        result = _autograd_chunk(student, teacher, targets, spec, ce_scale, kd_scale)
    return result


def mixed_loss(
    ctx: Any, ce_total: Tensor, kd_total: Tensor, n: int, spec: LossSpec
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, ce, kd) of a chunked Function's forward from its CE and KD sums over n positions: token
    means, ce and kd marked without gradient, loss = spec.ce_weight CE + spec.kd_weight KD (a copy of the term
    itself when it has weight 1 and the other 0, so that its value is bit for bit the metric's)."""
    ce, kd = ce_total / max(n, 1), kd_total / max(n, 1)
    if spec.kd_weight == 0.0:
        loss = ce.clone() if spec.ce_weight == 1.0 else spec.ce_weight * ce
    elif spec.ce_weight == 0.0:
        loss = kd.clone() if spec.kd_weight == 1.0 else spec.kd_weight * kd
    else:
        loss = spec.ce_weight * ce + spec.kd_weight * kd
    ctx.mark_non_differentiable(ce, kd)
    return loss, ce, kd


def _gather_rows(source: Tensor, index: Tensor, out: Tensor) -> Tensor:
    """source[index] as float32, written into `out`."""
    if source.dtype == torch.float32:
        return torch.index_select(source, 0, index, out=out)
    return out.copy_(source.index_select(0, index))


class ChunkedLoss(torch.autograd.Function):
    """ce_weight CE + kd_weight KD, token means over `positions`, with the student's gradient precomputed.

    forward walks the positions `spec.rows` at a time: the chunk's student and teacher rows are gathered
    into float32 scratch tensors that every chunk reuses, chunk_loss gives the chunk's sums and gradient,
    and the gradient goes into a buffer shaped like the student logits, in their dtype (rows outside
    `positions` are zeroed, the others written once). The peak holds one chunk's float32 intermediates
    instead of the full [N, V] ones of both models, plus that buffer, which autograd would allocate for
    the student logits anyway. backward hands the buffer over as the gradient (see release_or_copy):
    scaled in place by the incoming gradient and let go of, so it is never copied and not kept alive by
    the graph for as long as the loss tensor lives.
    targets: the gold next tokens at `positions`, or None for KD alone. Returns (loss, ce, kd), the last
    two without gradient; loss is ce or kd itself when the other weight is 0.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student_flat: Tensor,
        teacher_flat: Tensor,
        positions: Tensor,
        targets: Tensor | None,
        spec: LossSpec,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, width, vocab = positions.numel(), student_flat.shape[1], spec.vocab
        device = student_flat.device
        grad_buffer = None
        if spec.need_grad:
            grad_buffer = torch.empty_like(student_flat, memory_format=torch.contiguous_format)
            outside = torch.ones(grad_buffer.shape[0], dtype=torch.bool, device=device)
            outside[positions] = False
            grad_buffer.index_fill_(0, outside.nonzero().squeeze(1), 0.0)
            if width != vocab and (targets is None or spec.ce_weight == 0.0):
                grad_buffer[:, vocab:] = 0.0  # no CE gradient: KD's reaches the first `vocab` columns only
        scratch = Scratch(device)
        ce_total = torch.zeros((), dtype=torch.float32, device=device)
        kd_total = torch.zeros((), dtype=torch.float32, device=device)
        for start in range(0, n, spec.rows):
            index = positions[start : start + spec.rows]
            rows = index.numel()
            student = _gather_rows(student_flat, index, scratch("student", rows, width))
            teacher = _gather_rows(teacher_flat[:, :vocab], index, scratch("teacher", rows, vocab))
            chunk_targets = None if targets is None else targets[start : start + rows]
            ce_sum, kd_sum, grad = chunk_loss(student, teacher, chunk_targets, spec, n, scratch)
            ce_total += ce_sum
            kd_total += kd_sum
            if grad_buffer is not None and grad is not None:
                destination = grad_buffer if grad.shape[1] == width else grad_buffer[:, :vocab]
                destination.index_copy_(0, index, grad.to(grad_buffer.dtype))
        ctx.grad_buffer = grad_buffer
        return mixed_loss(ctx, ce_total, kd_total, n, spec)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: Tensor, _grad_ce: Tensor, _grad_kd: Tensor
    ) -> tuple[Tensor | None, ...]:
        return (release_or_copy(ctx, "grad_buffer", grad_loss), None, None, None, None)
