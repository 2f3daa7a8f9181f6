"""Token-level knowledge-distillation objectives: the divergence between the teacher's next-token
distribution p and the student's q at every response position (method.md section 2).

    fkl   KL(p||q) = sum p (log p - log q)
    rkl   KL(q||p)
    js    beta KL(p||m) + (1-beta) KL(q||m),  m = beta p + (1-beta) q    (option normalized: / beta(1-beta))
    tvd   1/2 sum |p - q|
    skl   KL(p || alpha p + (1-alpha) q)                                 (DistiLLM skew KL)
    srkl  KL(q || (1-alpha) p + alpha q)                                 (skew reverse KL)
    akl   w_head FKL + w_tail RKL, weights from the |p - q| gap on the teacher's head / tail   (adaptive KL)

p and q are softmaxes of the logits divided by the temperature T (no T^2 factor is applied). All
arithmetic is float32 whatever the logits' dtype, in log space: mixtures use log-sum-exp, and
log-probabilities are floored at -1e30 so that a zero probability (a -inf logit) contributes
0 * log 0 = 0 and never NaN (a KL that is truly infinite comes out huge instead).

`kd_loss` averages a divergence over the masked-in positions, optionally chunk by chunk so that the
full [positions, vocab] float32 distributions of both models never exist at once; `distillation_loss`
mixes it with the student's cross-entropy on the gold response: (1 - kd_rate) CE + kd_rate KD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor
from torch.autograd.function import once_differentiable

from warmup_distill_kedro.core.encoding import IGNORE_INDEX, shifted_token_logprobs

OBJECTIVES: tuple[str, ...] = ("fkl", "rkl", "js", "tvd", "skl", "srkl", "akl")

# Each objective's options and their defaults; the ranges are checked in validate_options.
_DEFAULTS: dict[str, dict[str, float | bool]] = {
    "fkl": {},
    "rkl": {},
    "js": {"beta": 0.5, "normalized": False},
    "tvd": {},
    "skl": {"alpha": 0.1},
    "srkl": {"alpha": 0.1},
    "akl": {"mu": 0.5},
}
_LOG_FLOOR = -1e30  # floor of log-probabilities: exp() of it is exactly 0, differences of it stay finite


def _unknown_objective(objective: object) -> str:
    return f"unknown KD objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}"


def _real(objective: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{objective} option {name!r} must be a number, got {value!r}")
    return float(value)


def validate_options(objective: str, **options: Any) -> dict[str, Any]:
    """Check an objective's options and return them with the defaults filled in.

    js: beta in (0, 1) (default 0.5), or in [0, 1] with normalized=True; skl / srkl: alpha in [0, 1)
    (default 0.1); akl: mu in (0, 1) (default 0.5); fkl, rkl, tvd take no options.
    """
    if objective not in _DEFAULTS:
        raise ValueError(_unknown_objective(objective))
    accepted = _DEFAULTS[objective]
    for name in options:
        if name not in accepted:
            takes = f"it accepts: {', '.join(accepted)}" if accepted else "it takes no options"
            raise ValueError(f"unknown option {name!r} for KD objective {objective!r}; {takes}")
    resolved: dict[str, Any] = {**accepted, **options}
    if objective == "js":
        normalized = resolved["normalized"]
        if not isinstance(normalized, bool):
            raise ValueError(f"js option 'normalized' must be true or false, got {normalized!r}")
        beta = resolved["beta"] = _real(objective, "beta", resolved["beta"])
        if normalized and not 0.0 <= beta <= 1.0:
            raise ValueError(f"js option 'beta' must be in [0, 1] with normalized=True, got {beta}")
        if not normalized and beta in (0.0, 1.0):
            endpoint = "fkl" if beta == 0.0 else "rkl"
            raise ValueError(
                f"js option 'beta' must be in (0, 1), got {beta}: the unnormalized js is identically 0 there; use objective {endpoint!r} for that endpoint, or normalized=True (divides by beta(1-beta): equals fkl at beta=0 and rkl at beta=1)"
            )
        if not normalized and not 0.0 < beta < 1.0:
            raise ValueError(
                f"js option 'beta' must be in (0, 1) (or [0, 1] with normalized=True), got {beta}"
            )
    elif objective in ("skl", "srkl"):
        alpha = resolved["alpha"] = _real(objective, "alpha", resolved["alpha"])
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"{objective} option 'alpha' must be in [0, 1), got {alpha}")
    elif objective == "akl":
        mu = resolved["mu"] = _real(objective, "mu", resolved["mu"])
        if not 0.0 < mu < 1.0:
            raise ValueError(f"akl option 'mu' must be in (0, 1), got {mu}")
    return resolved


def _check_temperature(temperature: float) -> float:
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return value


# -- the per-position math (float32 log-probabilities in, [...] float32 out) --------------------------------
def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    return torch.log_softmax(scaled, dim=-1).clamp(min=_LOG_FLOOR)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a||b) along the last dim; a = 0 gives 0 (exp(floor) is exactly 0, the difference is finite)."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


def _kl_to_mix(log_a: Tensor, log_b: Tensor, w_b: float) -> Tensor:
    """KL(a || m) with m = (1 - w_b) a + w_b b, for 0 < w_b <= 1.

    The mixture's log-sum-exp is taken relative to log a, with r = log b - log a:
        log m - log a = logaddexp(log(1 - w_b), log(w_b) + r) = log1p(w_b * expm1(r)),
    the second form where r <= 0 and its log1p argument stays above -1/2 (it is exactly 0 at r = 0, so
    a == b gives exactly 0), the first elsewhere. A mixture close to a thus gets its small log-ratio
    directly, not as the difference of two O(1) log-probabilities, which would lose the O(w_b) signal
    in float32 (normalized js near beta = 0 or 1 depends on it).
    """
    if w_b == 1.0:
        return _kl(log_a, log_b)
    log_ratio = log_b - log_a
    keep = torch.tensor(math.log1p(-w_b), dtype=log_a.dtype, device=log_a.device)
    by_logaddexp = torch.logaddexp(keep, log_ratio + math.log(w_b))
    shift = w_b * torch.expm1(log_ratio.clamp(max=0.0))  # in [-w_b, 0]; the clamp keeps inf out of backward
    by_log1p = torch.log1p(shift.clamp(min=-0.5))  # the clamp keeps log1p(-1) = -inf out of backward
    log_m_over_a = torch.where((log_ratio <= 0) & (shift > -0.5), by_log1p, by_logaddexp)
    return -(log_a.exp() * log_m_over_a).sum(dim=-1)


def _akl(log_q: Tensor, log_p: Tensor, mu: float) -> Tensor:
    with torch.no_grad():  # the weights carry no gradient
        p, q = log_p.exp(), log_q.exp()
        gap = (p - q).abs()
        sorted_p, order = p.sort(dim=-1, descending=True)
        # Mass strictly before each token: the head holds every token up to and including the one crossing mu.
        mass_before = torch.nn.functional.pad(sorted_p.cumsum(dim=-1)[..., :-1], (1, 0))
        head = torch.zeros_like(order, dtype=torch.bool).scatter(-1, order, mass_before < mu)
        g_head = gap.masked_fill(~head, 0.0).sum(dim=-1)
        g_tail = gap.masked_fill(head, 0.0).sum(dim=-1)
        total = g_head + g_tail
        nonzero = total > 0
        safe_total = torch.where(nonzero, total, torch.ones_like(total))
        w_head = torch.where(nonzero, g_head / safe_total, torch.zeros_like(total))
        w_tail = torch.where(nonzero, g_tail / safe_total, torch.zeros_like(total))
    return w_head * _kl(log_p, log_q) + w_tail * _kl(log_q, log_p)


def _per_position(objective: str, log_q: Tensor, log_p: Tensor, options: dict[str, Any]) -> Tensor:
    if objective == "fkl":
        return _kl(log_p, log_q)
    if objective == "rkl":
        return _kl(log_q, log_p)
    if objective == "js":
        beta, normalized = options["beta"], options["normalized"]
        if normalized and beta == 0.0:
            return _kl(log_p, log_q)
        if normalized and beta == 1.0:
            return _kl(log_q, log_p)
        kl_p_m = _kl_to_mix(log_p, log_q, 1.0 - beta)  # m = beta p + (1 - beta) q
        kl_q_m = _kl_to_mix(log_q, log_p, beta)
        if normalized:  # beta KL(p||m) + (1-beta) KL(q||m), divided by beta (1 - beta)
            return kl_p_m / (1.0 - beta) + kl_q_m / beta
        return beta * kl_p_m + (1.0 - beta) * kl_q_m
    if objective == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    if objective == "skl":
        alpha = options["alpha"]
        return _kl_to_mix(log_p, log_q, 1.0 - alpha)  # m = alpha p + (1 - alpha) q
    if objective == "srkl":
        alpha = options["alpha"]
        return _kl_to_mix(log_q, log_p, 1.0 - alpha)  # m = (1 - alpha) p + alpha q
    if objective == "akl":
        return _akl(log_q, log_p, options["mu"])
    raise ValueError(_unknown_objective(objective))


def _divergence(
    objective: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    options: dict[str, Any],
) -> Tensor:
    log_q = _log_probs(student_logits, temperature)
    log_p = _log_probs(teacher_logits, temperature)
    return _per_position(objective, log_q, log_p, options)


def divergence(
    objective: str, student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, **options: Any
) -> Tensor:
    """Per-position divergence between teacher and student: logits [N, V] (any leading shape) -> [N] float32.

    No masking and no reduction; differentiable in both arguments (kd_loss is the one that stops the
    teacher's gradient). Options as in validate_options.
    """
    resolved = validate_options(objective, **options)
    temperature = _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in shape"
        )
    return _divergence(objective, student_logits, teacher_logits, temperature, resolved)


# -- the masked mean, direct or chunked ---------------------------------------------------------------------
class _ChunkedKD(torch.autograd.Function):
    """Mean divergence over `positions`, computed chunk by chunk with the student's gradient precomputed.

    forward loops over chunks of positions; each chunk's student rows are upcast to a detached float32
    copy, the chunk's summed divergence is differentiated with torch.autograd.grad at once, and the
    gradient (scaled by 1/n) is written into a buffer shaped like the student logits, in their dtype.
    The chunk's float32 intermediates are freed before the next chunk, so the peak holds one chunk's
    [chunk_size, V] float32 tensors instead of the full [N, V] ones of both models (log-softmaxes,
    probabilities, mixtures and their saved-for-backward copies), plus the gradient buffer that autograd
    would allocate for the student logits anyway. backward hands that buffer over as the gradient, scaled
    in place by the incoming gradient, and lets go of it (see _release_or_copy), so it is never copied and
    not kept alive by the graph for as long as the loss tensor lives.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student_flat: Tensor,
        teacher_flat: Tensor,
        positions: Tensor,
        objective: str,
        options: dict[str, Any],
        temperature: float,
        vocab: int,
        chunk_size: int,
        need_grad: bool,
    ) -> Tensor:
        n = positions.numel()
        total = torch.zeros((), dtype=torch.float32, device=student_flat.device)
        grad_buffer = (
            torch.zeros_like(student_flat, memory_format=torch.contiguous_format) if need_grad else None
        )
        for start in range(0, n, chunk_size):
            index = positions[start : start + chunk_size]
            teacher_rows = teacher_flat[index, :vocab]
            student_rows = student_flat[index, :vocab].detach().float()
            if grad_buffer is None:
                chunk_loss = _divergence(objective, student_rows, teacher_rows, temperature, options).sum()
            else:
                with torch.enable_grad():
                    student_rows.requires_grad_(True)
                    chunk_loss = _divergence(
                        objective, student_rows, teacher_rows, temperature, options
                    ).sum()
                    (chunk_grad,) = torch.autograd.grad(chunk_loss, student_rows)
                grad_buffer[index, :vocab] = (chunk_grad / n).to(grad_buffer.dtype)
            total += chunk_loss.detach()
        ctx.grad_buffer = grad_buffer
        return total / n

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad = _release_or_copy(ctx, "grad_buffer", grad_output)
        return (grad, None, None, None, None, None, None, None, None)


def _keeps_graph() -> bool:
    """Whether the running backward was asked to keep the graph (retain_graph=True); True if unknown."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else bool(keep_graph())


_RELEASED = "released"  # what a ctx holds in place of a gradient buffer that a backward handed over


def _release_or_copy(ctx: Any, name: str, grad_output: Tensor) -> Tensor | None:
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


# -- closed forms: fkl and rkl, value and student gradient in one chunked pass, CE folded in ----------------
# The objectives computed by _ClosedFormLoss (kd_loss and distillation_loss pick it for them; the others
# differentiate _divergence with autograd).
_CLOSED_FORM: frozenset[str] = frozenset({"fkl", "rkl"})

# Default float32 elements per [rows, vocab] scratch tensor of one chunk, by device type. On a CPU a chunk's
# few scratch tensors stay in the caches and are reused chunk after chunk (fresh full-size allocations cost
# page faults there, more than the arithmetic); a GPU wants few, large kernels.
_CHUNK_ELEMENTS: dict[str, int] = {"cpu": 1 << 21, "cuda": 1 << 26}


def _chunk_rows(width: int, device: torch.device, chunk_size: int | None) -> int:
    """Positions per chunk of the closed form: the device's default, capped by chunk_size when given."""
    rows = max(1, _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cuda"]) // width)
    return rows if chunk_size is None else min(rows, chunk_size)


class _Scratch:
    """Float32 [rows, width] scratch tensors by name, allocated once and reused chunk after chunk."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[str, Tensor] = {}

    def __call__(self, name: str, rows: int, width: int) -> Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != width:
            buffer = torch.empty(rows, width, dtype=torch.float32, device=self.device)
            self.buffers[name] = buffer
        return buffer[:rows]


def _closed_form_chunk(
    student: Tensor,
    teacher: Tensor,
    targets: Tensor | None,
    objective: str,
    temperature: float,
    ce_scale: float,
    kd_scale: float,
    need_grad: bool,
    scratch: _Scratch,
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """CE and KD sums of a chunk and the gradient of ce_scale * CE + kd_scale * KD w.r.t. its student rows.

    student: float32 [c, W] logits (CE uses all W columns, KD the first V); teacher: float32 [c, V]. Both
    are overwritten. With x = (s - max s) / T, y = (t - max t) / T, lx, ly their log-sum-exps, and
    q = softmax(x), p = softmax(y) (log q = x - lx, log p = y - ly):
        fkl  KL(p||q) = sum p (y - x) - (ly - lx),   d/ds = (q - p) / T
        rkl  KL(q||p) = sum q (x - y) + (ly - lx),   d/ds_j = q_j (log q_j - log p_j - KL) / T
        CE   lse(s) - s_target,                      d/ds = softmax(s) - onehot(target)
    CE's exponentials exp(s - max s) are q's own at T = 1 and their squares at T = 2 (when W = V): no
    second exp pass. Teacher log-probabilities are floored at _LOG_FLOOR as in _log_probs (a zero teacher
    probability contributes 0); a student row that reaches the floor (a -inf logit) returns None, and the
    caller takes the autograd path, whose gradient through the floor's clamp differs from the closed form.
    The gradient is [c, W], or [c, V] when it has no CE part; it may be one of the scratch tensors.
    """
    rows, vocab = teacher.shape
    width = student.shape[1]
    inv_t = 1.0 / temperature
    head = student[:, :vocab]
    x_max = head.amax(dim=-1, keepdim=True)
    x = torch.add(x_max * -inv_t, head, alpha=inv_t, out=scratch("x", rows, vocab))  # (s - max s) / T
    if bool(x.amin() < _LOG_FLOOR):
        return None
    q = torch.exp(x, out=scratch("q", rows, vocab))  # unnormalized: softmax = q / q_sum
    q_sum = q.sum(dim=-1, keepdim=True)
    y = torch.add(teacher.amax(dim=-1, keepdim=True) * -inv_t, teacher, alpha=inv_t, out=teacher)
    y.clamp_(min=_LOG_FLOOR)
    p = torch.exp(y, out=scratch("p", rows, vocab))
    p_sum = p.sum(dim=-1, keepdim=True)
    log_ratio = p_sum.log() - q_sum.log()  # ly - lx

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

    if objective == "fkl":
        w = None
        kd_rows = y.sub_(x).mul_(p).sum(dim=-1, keepdim=True) / p_sum - log_ratio
    else:  # rkl
        w = torch.sub(x, y, out=y).mul_(q)  # q_sum * q (x - y), kept for the gradient
        w_mean = w.sum(dim=-1, keepdim=True) / q_sum  # sum q (x - y)
        kd_rows = w_mean + log_ratio
    kd_sum = kd_rows.sum()
    if not need_grad:
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
        if w is None:
            grad[:, :vocab].addcmul_(q, g / q_sum).addcmul_(p, -g / p_sum)
        else:
            grad[:, :vocab].addcmul_(w.addcmul_(q, -w_mean), g / q_sum)
    elif a != 0.0 and temperature == 2.0:  # + a q^2 / sum(q^2)
        ce_coef = a / ce_exp_sum
        if w is None:
            grad = torch.addcmul(g / q_sum, q, ce_coef, out=x).mul_(q).addcmul_(p, -g / p_sum)
        else:
            grad = w.addcmul_(q, -w_mean).mul_(g / q_sum).addcmul_(q, torch.mul(q, ce_coef, out=x))
    elif w is None:  # no CE gradient, or T = 1: + a q / q_sum
        grad = q.mul_((g + a) / q_sum).addcmul_(p, -g / p_sum)
    else:
        grad = w.addcmul_(q, a / g - w_mean).mul_(g / q_sum)
    if a != 0.0:
        grad.scatter_add_(1, targets.unsqueeze(1), grad.new_full((rows, 1), -a))  # type: ignore[union-attr]
    return ce_sum, kd_sum, grad


def _autograd_chunk(
    student: Tensor,
    teacher: Tensor,
    targets: Tensor | None,
    objective: str,
    options: dict[str, Any],
    temperature: float,
    ce_scale: float,
    kd_scale: float,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """What _closed_form_chunk returns, by differentiating _divergence (and the log-softmax) with autograd."""
    student = student.detach().requires_grad_(need_grad)
    ce_sum = torch.zeros((), dtype=torch.float32, device=student.device)
    if targets is not None:
        with torch.set_grad_enabled(need_grad and ce_scale > 0.0):
            log_q = torch.log_softmax(student, dim=-1)  # the student's full width, no temperature
            ce_sum = -log_q.gather(1, targets.unsqueeze(1)).sum()
            del log_q
    with torch.set_grad_enabled(need_grad and kd_scale > 0.0):
        kd_sum = _divergence(objective, student[:, : teacher.shape[1]], teacher, temperature, options).sum()
    if not need_grad:
        return ce_sum, kd_sum, None
    with torch.enable_grad():
        share = [
            term * scale for term, scale in ((ce_sum, ce_scale), (kd_sum, kd_scale)) if term.requires_grad
        ]
        grad = torch.autograd.grad(sum(share), student)[0] if share else torch.zeros_like(student)
    return ce_sum.detach(), kd_sum.detach(), grad


def _chunk_loss(
    student: Tensor,
    teacher: Tensor,
    targets: Tensor | None,
    objective: str,
    options: dict[str, Any],
    temperature: float,
    ce_scale: float,
    kd_scale: float,
    need_grad: bool,
    scratch: _Scratch | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One chunk's CE sum (0 without targets), KD sum and the gradient of ce_scale * CE + kd_scale * KD
    w.r.t. its float32 student rows [c, W] (None without need_grad; [c, V] when it has no CE part).

    The closed form for the objectives in _CLOSED_FORM, autograd otherwise; student [c, W] and teacher
    [c, V] are float32 and may be overwritten. CE is over all W columns at temperature 1, KD over the first V.
    """
    if objective in _CLOSED_FORM:
        scratch = _Scratch(student.device) if scratch is None else scratch
        result = _closed_form_chunk(
            student, teacher, targets, objective, temperature, ce_scale, kd_scale, need_grad, scratch
        )
        if result is not None:
            return result
    return _autograd_chunk(
        student, teacher, targets, objective, options, temperature, ce_scale, kd_scale, need_grad
    )


@dataclass(frozen=True)
class _LossSpec:
    """What _ClosedFormLoss needs besides tensors."""

    objective: str
    options: dict[str, Any]
    temperature: float
    vocab: int  # KD compares the first `vocab` columns; CE uses the student's full width
    rows: int  # positions per chunk
    ce_weight: float
    kd_weight: float
    need_grad: bool


def _gather_rows(source: Tensor, index: Tensor, out: Tensor) -> Tensor:
    """source[index] as float32, written into `out`."""
    if source.dtype == torch.float32:
        return torch.index_select(source, 0, index, out=out)
    return out.copy_(source.index_select(0, index))


class _ClosedFormLoss(torch.autograd.Function):
    """ce_weight CE + kd_weight KD, token means over `positions`, with the student's gradient precomputed.

    forward walks the positions `spec.rows` at a time: the chunk's student and teacher rows are gathered
    into float32 scratch tensors that every chunk reuses, _chunk_loss gives the chunk's sums and gradient,
    and the gradient goes into a buffer shaped like the student logits, in their dtype (rows outside
    `positions` are zeroed, the others written once). backward hands that buffer over as _ChunkedKD does
    (see _release_or_copy). targets (the gold next tokens at `positions`) or None for KD alone. Returns
    (loss, ce, kd), the last two without gradient; loss is ce or kd itself when the other weight is 0.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student_flat: Tensor,
        teacher_flat: Tensor,
        positions: Tensor,
        targets: Tensor | None,
        spec: _LossSpec,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, width, vocab = positions.numel(), student_flat.shape[1], spec.vocab
        device = student_flat.device
        ce_scale, kd_scale = spec.ce_weight / max(n, 1), spec.kd_weight / max(n, 1)
        grad_buffer = None
        if spec.need_grad:
            grad_buffer = torch.empty_like(student_flat, memory_format=torch.contiguous_format)
            outside = torch.ones(grad_buffer.shape[0], dtype=torch.bool, device=device)
            outside[positions] = False
            grad_buffer.index_fill_(0, outside.nonzero().squeeze(1), 0.0)
            if width != vocab and (targets is None or spec.ce_weight == 0.0):
                grad_buffer[:, vocab:] = 0.0  # no CE gradient: KD's reaches the first `vocab` columns only
        scratch = _Scratch(device)
        ce_total = torch.zeros((), dtype=torch.float32, device=device)
        kd_total = torch.zeros((), dtype=torch.float32, device=device)
        for start in range(0, n, spec.rows):
            index = positions[start : start + spec.rows]
            rows = index.numel()
            student = _gather_rows(student_flat, index, scratch("student", rows, width))
            teacher = _gather_rows(teacher_flat[:, :vocab], index, scratch("teacher", rows, vocab))
            chunk_targets = None if targets is None else targets[start : start + rows]
            ce_sum, kd_sum, grad = _chunk_loss(
                student,
                teacher,
                chunk_targets,
                spec.objective,
                spec.options,
                spec.temperature,
                ce_scale,
                kd_scale,
                spec.need_grad,
                scratch,
            )
            ce_total += ce_sum
            kd_total += kd_sum
            if grad_buffer is not None and grad is not None:
                destination = grad_buffer if grad.shape[1] == width else grad_buffer[:, :vocab]
                destination.index_copy_(0, index, grad.to(grad_buffer.dtype))
        ctx.grad_buffer = grad_buffer
        ce, kd = ce_total / max(n, 1), kd_total / max(n, 1)
        if spec.kd_weight == 0.0:
            loss = ce.clone()
        elif spec.ce_weight == 0.0:
            loss = kd.clone()
        else:
            loss = spec.ce_weight * ce + spec.kd_weight * kd
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: Tensor, _grad_ce: Tensor, _grad_kd: Tensor
    ) -> tuple[Tensor | None, ...]:
        return (_release_or_copy(ctx, "grad_buffer", grad_loss), None, None, None, None)


def _common_vocab(student_size: int, teacher_size: int, vocab_size: int | None) -> int:
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
    chunk_size=None differentiates directly through the whole [n_positions, V] computation; chunk_size=k
    runs k positions at a time (see _ChunkedKD) with the same value and gradient and a peak memory of one
    chunk's float32 intermediates instead of the full [n_positions, V] ones of both models.
    """
    resolved = validate_options(objective, **options)
    temperature = _check_temperature(temperature)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
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
    vocab = _common_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)

    teacher_flat = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    student_flat = student_logits.reshape(-1, student_logits.shape[-1])
    flat_mask = mask.reshape(-1).to(student_flat.device)
    if objective in _CLOSED_FORM:
        positions = flat_mask.nonzero().squeeze(1)
        if positions.numel() == 0:
            return student_flat[:0].float().sum()
        spec = _LossSpec(
            objective=objective,
            options=resolved,
            temperature=temperature,
            vocab=vocab,
            rows=_chunk_rows(student_flat.shape[1], student_flat.device, chunk_size),
            ce_weight=0.0,
            kd_weight=1.0,
            need_grad=torch.is_grad_enabled() and student_logits.requires_grad,
        )
        loss, _, _ = _ClosedFormLoss.apply(student_flat, teacher_flat, positions, None, spec)
        return loss
    if chunk_size is None:
        student_rows = student_flat[:, :vocab][flat_mask]
        if student_rows.shape[0] == 0:
            return student_rows.float().sum()  # 0.0 with the graph intact
        teacher_rows = teacher_flat[:, :vocab][flat_mask]
        return _divergence(objective, student_rows, teacher_rows, temperature, resolved).mean()
    positions = flat_mask.nonzero().squeeze(1)
    if positions.numel() == 0:
        return student_flat[:0].float().sum()
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _ChunkedKD.apply(
        student_flat, teacher_flat, positions, objective, resolved, temperature, vocab, chunk_size, need_grad
    )


# -- the distill stage's loss -------------------------------------------------------------------------------
class KDConfig(BaseModel):
    """The `distill` stage's typed parameter block for the divergence."""

    model_config = ConfigDict(extra="forbid")

    objective: str = Field("fkl", description=f"one of {', '.join(OBJECTIVES)}")
    temperature: float = Field(2.0, gt=0, allow_inf_nan=False, description="logits are divided by it")
    kd_rate: float = Field(0.5, ge=0, le=1, description="loss = (1 - kd_rate) CE + kd_rate KD")
    options: dict[str, float | bool] = Field(
        default_factory=dict,
        description="the objective's options (js: beta, normalized; skl/srkl: alpha; akl: mu)",
    )
    chunk_size: int | None = Field(None, gt=0, description="positions per KD chunk; null: all at once")

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, value: str) -> str:
        if value not in OBJECTIVES:
            raise ValueError(_unknown_objective(value))
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
) -> tuple[Tensor, dict[str, float]]:
    """(1 - kd_rate) CE(student, labels) + kd_rate KD over the response positions, with metrics.

    logits [B, T, V] at position t predict labels[:, t+1]; positions whose next label is IGNORE_INDEX
    (prompt, padding) count in neither term. CE is the token mean over the student's full vocabulary,
    as in causal_lm_loss; KD is kd_loss with the config's objective, temperature, options and chunk size.
    A term whose weight is 0 is computed for its metric only, without a graph.
    Metrics: loss, ce, kd, tokens (the number of response positions).
    For the objectives with a closed form (fkl, rkl) both terms, their values and the student's gradient
    come from one chunked pass over the response positions (_ClosedFormLoss); the others go through
    shifted_token_logprobs and kd_loss with autograd.
    """
    if config.objective in _CLOSED_FORM:
        return _closed_form_distillation_loss(student_logits, teacher_logits, labels, config, vocab_size)
    grad_enabled = torch.is_grad_enabled()
    with torch.set_grad_enabled(grad_enabled and config.kd_rate < 1.0):
        token_logprobs, mask = shifted_token_logprobs(student_logits, labels)
        n_tokens = mask.sum()
        ce = -token_logprobs.sum() / n_tokens.clamp(min=1)
    kd_mask = torch.zeros(labels.shape, dtype=torch.bool, device=mask.device)
    kd_mask[:, :-1] = mask  # logits at t are scored against the token at t + 1
    with torch.set_grad_enabled(grad_enabled and config.kd_rate > 0.0):
        kd = kd_loss(
            config.objective,
            student_logits,
            teacher_logits,
            kd_mask,
            temperature=config.temperature,
            chunk_size=config.chunk_size,
            vocab_size=vocab_size,
            **config.options,
        )
    if config.kd_rate == 0.0:
        loss = ce
    elif config.kd_rate == 1.0:
        loss = kd
    else:
        loss = (1.0 - config.kd_rate) * ce + config.kd_rate * kd
    metrics = {"loss": loss.item(), "ce": ce.item(), "kd": kd.item(), "tokens": float(n_tokens.item())}
    return loss, metrics


def _closed_form_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    config: KDConfig,
    vocab_size: int | None,
) -> tuple[Tensor, dict[str, float]]:
    """distillation_loss for an objective in _CLOSED_FORM: CE and KD in one _ClosedFormLoss pass."""
    if student_logits.dim() != 3 or student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} must be [batch, time, vocab] with the same batch and time"
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match the logits' positions {tuple(student_logits.shape[:-1])}"
        )
    vocab = _common_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    student_flat = student_logits.reshape(-1, student_logits.shape[-1])
    teacher_flat = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    # Position t predicts labels[:, t + 1]; the last position predicts nothing.
    next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    next_labels = next_labels.to(student_flat.device)
    positions = (next_labels != IGNORE_INDEX).nonzero().squeeze(1)
    spec = _LossSpec(
        objective=config.objective,
        options=config.options,
        temperature=float(config.temperature),
        vocab=vocab,
        rows=_chunk_rows(student_flat.shape[1], student_flat.device, config.chunk_size),
        ce_weight=1.0 - config.kd_rate,
        kd_weight=float(config.kd_rate),
        need_grad=torch.is_grad_enabled() and student_logits.requires_grad,
    )
    loss, ce, kd = _ClosedFormLoss.apply(student_flat, teacher_flat, positions, next_labels[positions], spec)
    metrics = {"loss": loss.item(), "ce": ce.item(), "kd": kd.item(), "tokens": float(positions.numel())}
    return loss, metrics
