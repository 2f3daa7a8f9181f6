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

The masked means over positions that training uses are in core.kd_losses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional
from torch import Tensor

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
