"""Token-level knowledge-distillation objectives: the divergence between the teacher's next-token
distribution p and the student's q at every response position (docs/method.md).

    fkl   KL(p||q) = sum p (log p - log q)
    rkl   KL(q||p)
    js    beta KL(p||m) + (1-beta) KL(q||m),  m = beta p + (1-beta) q    (option normalized: / beta(1-beta))
    tvd   1/2 sum |p - q|
    skl   KL(p || alpha p + (1-alpha) q)                                 (DistiLLM skew KL)
    srkl  KL(q || (1-alpha) p + alpha q)                                 (skew reverse KL)
    akl   w_head FKL + w_tail RKL, weights from the |p - q| gap on the teacher's head / tail   (adaptive KL;
          head: the top tokens up to the one crossing cumulative mass mu, that one included (crossing:
          head, DSKD's code) or not (crossing: tail, the AKL code), ties with it alike; mu = 1 - DSKD's
          adaptive_kl_alpha)
    dpkd  -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h), h = (log q[c] - log q[r]) - (log p[c] - log p[r]),
          c = argmax p, r = argmax q                                     (DPKD, token level)

p and q are softmaxes of the logits divided by the temperature T (no T^2 factor is applied). All
arithmetic is float32 whatever the logits' dtype, in log space: a mixture's log-ratios come from one
log1p(w expm1(r)) per position (mix_log_ratios), and log-probabilities are floored at -1e30 so that a zero probability (a -inf logit) contributes
0 * log 0 = 0 and never NaN (a KL that is truly infinite comes out huge instead).

The masked means over positions that training uses are in core.kd.losses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional
from torch import Tensor

OBJECTIVES: tuple[str, ...] = ("fkl", "rkl", "js", "tvd", "skl", "srkl", "akl", "dpkd")

# Each objective's options and their defaults; the ranges are checked in validate_options.
_DEFAULTS: dict[str, dict[str, float | bool | str]] = {
    "fkl": {},
    "rkl": {},
    "js": {"beta": 0.5, "normalized": False},
    "tvd": {},
    "skl": {"alpha": 0.1},
    "srkl": {"alpha": 0.1},
    "akl": {"mu": 0.5, "crossing": "head"},
    "dpkd": {"beta": 0.1, "label_smoothing": 0.0},
}
LOG_FLOOR = -1e30  # floor of log-probabilities: exp() of it is exactly 0, differences of it stay finite


def unknown_objective(objective: object) -> str:
    return f"unknown KD objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}"


def _real(objective: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{objective} option {name!r} must be a number, got {value!r}")
    return float(value)


def validate_options(objective: str, **options: Any) -> dict[str, Any]:
    """Check an objective's options and return them with the defaults filled in.

    js: beta in (0, 1) (default 0.5), or in [0, 1] with normalized=True; skl / srkl: alpha in [0, 1)
    (default 0.1); akl: mu in (0, 1) (default 0.5) and crossing, head or tail (default head); dpkd: beta > 0
    (default 0.1) and label_smoothing in [0, 0.5) (default 0); fkl, rkl, tvd take no options.
    """
    if objective not in _DEFAULTS:
        raise ValueError(unknown_objective(objective))
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
        if resolved["crossing"] not in CROSSINGS:
            raise ValueError(
                f"akl option 'crossing' must be one of {list(CROSSINGS)}, got {resolved['crossing']!r}"
            )
    elif objective == "dpkd":
        beta = resolved["beta"] = _real(objective, "beta", resolved["beta"])
        if not (math.isfinite(beta) and beta > 0.0):
            raise ValueError(f"dpkd option 'beta' must be a finite number > 0, got {beta}")
        smoothing = resolved["label_smoothing"] = _real(
            objective, "label_smoothing", resolved["label_smoothing"]
        )
        if not 0.0 <= smoothing < 0.5:
            raise ValueError(f"dpkd option 'label_smoothing' must be in [0, 0.5), got {smoothing}")
    return resolved


def check_temperature(temperature: float) -> float:
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return value


# -- the per-position math (float32 log-probabilities in, [...] float32 out) --------------------------------
def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    return torch.log_softmax(scaled, dim=-1).clamp(min=LOG_FLOOR)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a||b) along the last dim; a = 0 gives 0 (exp(floor) is exactly 0, the difference is finite)."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


# Where the log-ratio r = log p - log q of a mixture is clamped, on the side where expm1 would overflow:
# beyond it the mixture's log-ratio moves by less than exp(-80) / weight, relative, and the KL terms weigh
# it by a probability below exp(-80) anyway.
MIX_CLAMP = 80.0


def mix_log_ratios(log_q: Tensor, log_p: Tensor, p_weight: float) -> tuple[Tensor, Tensor]:
    """(log(m / q), log(m / p)) for the mixture m = p_weight p + (1 - p_weight) q, 0 < p_weight < 1.

    With r = log p - log q, the log-ratio to the distribution with the larger weight in m is computed
    directly and the other from it, by adding or subtracting r:
        p_weight <= 1/2:  log(m / q) = log1p(p_weight expm1(r)),          log(m / p) = log(m / q) - r
        p_weight >  1/2:  log(m / p) = log1p((1 - p_weight) expm1(-r)),   log(m / q) = log(m / p) + r
    so that log1p's argument never falls below -1/2 (no cancellation in 1 + x); a mixture close to q or p
    gets its small log-ratio directly, not as the difference of two O(1) log-probabilities, which would lose
    the O(weight) signal in float32 (normalized js near beta = 0 or 1 depends on it); p == q gives exactly 0.
    core.kd.chunked repeats these operations in place.
    """
    log_ratio = log_p - log_q
    if p_weight <= 0.5:
        r = log_ratio.clamp(max=MIX_CLAMP)
        log_m_q = torch.log1p(p_weight * torch.expm1(r))
        return log_m_q, log_m_q - r
    r = log_ratio.clamp(min=-MIX_CLAMP)
    log_m_p = torch.log1p((1.0 - p_weight) * torch.expm1(-r))
    return log_m_p + r, log_m_p


def _kl_to(log_a: Tensor, log_m_over_a: Tensor) -> Tensor:
    """KL(a || m) = -sum a log(m / a) along the last dim."""
    return -(log_a.exp() * log_m_over_a).sum(dim=-1)


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64}
# Where akl puts the token whose cumulative teacher mass crosses mu: in the head (DSKD's and KDFlow's code,
# the default: the head always holds at least mu of the mass) or in the tail (the AKL authors' get_ratio).
CROSSINGS: tuple[str, ...] = ("head", "tail")
# Rows whose top tokens hold mu are resolved from a top-k (one pass over the row); others by bisection.
_TOP_K = 16


def head_floor(p: Tensor, mu: Tensor | float, above: Tensor, crossing: str = "head") -> Tensor:
    """akl's head per row of p [N, V] (probabilities, float32 or float64; unnormalized with mu scaled to
    each row's total [N, 1]) as a floor [N, 1]: the head is p > floor. `above` is a scratch tensor like p.

    The crossing value v of a row is the probability of the token whose cumulative mass, tokens taken from
    the most likely, crosses mu: mass(p >= v) >= mu > mass(p > v). `crossing: head` puts it in the head
    (head = p >= v); `tail` in the tail (head = p > v), except when it is the top token, which the head
    always keeps (as the AKL code does). Tokens tied with the crossing one go where it goes, so the head
    does not depend on how a sort orders ties.

    v comes from the row's top 16 tokens (sorted, cumulated) where they hold mu, which is one pass over a
    peaked teacher's row; other rows find it by bisection on the floats' bit patterns (tokens_above_floor).
    """
    rows, width = p.shape
    k = min(_TOP_K, width)
    top = p.topk(k, dim=-1).values
    reaches = top.cumsum(dim=-1) >= mu  # [N, k]
    crossing_value = top.gather(1, reaches.to(torch.int8).argmax(dim=-1, keepdim=True))
    unresolved = ~reaches[:, -1]
    if bool(unresolved.any()):
        index = unresolved.nonzero().squeeze(1)
        row_mu = mu[index] if isinstance(mu, Tensor) else mu
        subset = p[index]
        lo = _bisect_floor(subset, row_mu, above[: index.numel()])
        crossing_value[index] = torch.where(subset > lo, subset, torch.inf).amin(dim=-1, keepdim=True)
    bits = _SAME_WIDTH_INT[p.dtype]
    below = (crossing_value.view(bits) - 1).view(p.dtype)  # the float just below v (v > 0)
    if crossing == "head":
        return below
    return torch.where(crossing_value < top[:, :1], crossing_value, below)


def _bisect_floor(p: Tensor, mu: Tensor | float, above: Tensor) -> Tensor:
    """A floor lo [N, 1] with mass(p > lo) >= mu > mass(p > hi) and (lo, hi] holding only the crossing
    value (or lo, hi adjacent floats), by bisection on the floats' bit patterns, which order like the
    non-negative values they encode (lo starts just below min p, above which lies all the mass, hi at
    max p, above which lies none). Two passes over the row per halving of the bracket."""
    bits = _SAME_WIDTH_INT[p.dtype]
    lo = (p.amin(dim=-1, keepdim=True).view(bits) - 1).clamp_(min=0)  # the float below the smallest p
    hi = p.amax(dim=-1, keepdim=True).view(bits)
    count_lo = torch.full_like(lo, p.shape[1])  # tokens above lo: all of them
    count_hi = torch.zeros_like(lo)  # tokens above hi
    while bool(((hi - lo > 1) & (count_lo - count_hi > 1)).any()):
        mid = lo + (hi - lo) // 2
        torch.gt(p, mid.view(p.dtype), out=above)  # 1.0 where p > mid, else 0.0
        count = above.sum(dim=-1, keepdim=True).to(bits)
        inside = above.mul_(p).sum(dim=-1, keepdim=True) < mu  # the mass above mid
        hi, count_hi = torch.where(inside, mid, hi), torch.where(inside, count, count_hi)
        lo, count_lo = torch.where(inside, lo, mid), torch.where(inside, count_lo, count)
    return lo.view(p.dtype)


def gap_shares(gap: Tensor, head: Tensor) -> tuple[Tensor, Tensor]:
    """(w_head, w_tail) [N]: the shares of the gap |p - q| [N, V] on the head (a 0/1 mask) and on the rest;
    both 0 where the gap is 0. `gap` is overwritten."""
    total = gap.sum(dim=-1)
    g_head = gap.mul_(head).sum(dim=-1)
    nonzero = total > 0
    safe_total = torch.where(nonzero, total, torch.ones_like(total))
    w_head = torch.where(nonzero, g_head / safe_total, torch.zeros_like(total))
    w_tail = torch.where(nonzero, (total - g_head) / safe_total, torch.zeros_like(total))
    return w_head, w_tail


def akl_weights(p: Tensor, q: Tensor, mu: float, crossing: str = "head") -> tuple[Tensor, Tensor]:
    """akl's (w_head, w_tail) per position, from probabilities p (teacher) and q (student) [..., V]: the
    shares of the |p - q| gap on the teacher's head (its top tokens up to and including the one whose
    cumulative mass crosses mu, head_floor) and on the rest; both 0 where p == q. No gradient."""
    with torch.no_grad():
        if p.dtype not in _SAME_WIDTH_INT:
            p, q = p.float(), q.float()
        p_rows, q_rows = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
        above = torch.empty_like(p_rows)
        head = torch.gt(p_rows, head_floor(p_rows, mu, above, crossing), out=above)
        w_head, w_tail = gap_shares((p_rows - q_rows).abs_(), head)
    return w_head.view(p.shape[:-1]), w_tail.view(p.shape[:-1])


def _akl(log_q: Tensor, log_p: Tensor, mu: float, crossing: str) -> Tensor:
    w_head, w_tail = akl_weights(log_p.detach().exp(), log_q.detach().exp(), mu, crossing)
    return w_head * _kl(log_p, log_q) + w_tail * _kl(log_q, log_p)


def reduced_objective(objective: str, options: dict[str, Any]) -> str:
    """The objective that computes `objective` with these options: fkl for skl at alpha 0 and for
    normalized js at beta 0, rkl for srkl at alpha 0 and for normalized js at beta 1 (their mixtures
    degenerate there), the objective itself otherwise."""
    if objective in ("skl", "srkl") and options["alpha"] == 0.0:
        return "fkl" if objective == "skl" else "rkl"
    if objective == "js" and options["normalized"] and options["beta"] in (0.0, 1.0):
        return "fkl" if options["beta"] == 0.0 else "rkl"
    return objective


def per_position(objective: str, log_q: Tensor, log_p: Tensor, options: dict[str, Any]) -> Tensor:
    objective = reduced_objective(objective, options)
    if objective == "fkl":
        return _kl(log_p, log_q)
    if objective == "rkl":
        return _kl(log_q, log_p)
    if objective == "js":
        beta, normalized = options["beta"], options["normalized"]
        log_m_q, log_m_p = mix_log_ratios(log_q, log_p, beta)  # m = beta p + (1 - beta) q
        kl_p_m, kl_q_m = _kl_to(log_p, log_m_p), _kl_to(log_q, log_m_q)
        if normalized:  # beta KL(p||m) + (1-beta) KL(q||m), divided by beta (1 - beta)
            return kl_p_m / (1.0 - beta) + kl_q_m / beta
        return beta * kl_p_m + (1.0 - beta) * kl_q_m
    if objective == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    if objective == "skl":  # KL(p || m), m = alpha p + (1 - alpha) q
        return _kl_to(log_p, mix_log_ratios(log_q, log_p, options["alpha"])[1])
    if objective == "srkl":  # KL(q || m), m = (1 - alpha) p + alpha q
        return _kl_to(log_q, mix_log_ratios(log_q, log_p, 1.0 - options["alpha"])[0])
    if objective == "akl":
        return _akl(log_q, log_p, options["mu"], options["crossing"])
    if objective == "dpkd":
        return _dpkd(log_q, log_p, options["beta"], options["label_smoothing"])
    raise ValueError(unknown_objective(objective))


def dpkd_margin(log_q: Tensor, log_p: Tensor) -> Tensor:
    """DPKD's h per position: (log q[ch] - log q[rej]) - (log p[ch] - log p[rej]), ch the teacher's most
    likely token and rej the student's (constants: no gradient flows through the choice)."""
    chosen = log_p.detach().argmax(dim=-1, keepdim=True)
    rejected = log_q.detach().argmax(dim=-1, keepdim=True)
    student = log_q.gather(-1, chosen) - log_q.gather(-1, rejected)
    teacher = log_p.gather(-1, chosen) - log_p.gather(-1, rejected)
    return (student - teacher).squeeze(-1)


def _dpkd(log_q: Tensor, log_p: Tensor, beta: float, smoothing: float) -> Tensor:
    """DPKD (arXiv 2406.19774) at one position: a DPO loss where the teacher's top token is preferred to
    the student's, the teacher the reference: -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)."""
    h = beta * dpkd_margin(log_q, log_p)
    logsigmoid = torch.nn.functional.logsigmoid
    return -(1.0 - smoothing) * logsigmoid(h) - smoothing * logsigmoid(-h)


def resolved_divergence(
    objective: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    options: dict[str, Any],
) -> Tensor:
    """`divergence` with its arguments already checked and its options resolved (validate_options)."""
    log_q = _log_probs(student_logits, temperature)
    log_p = _log_probs(teacher_logits, temperature)
    return per_position(objective, log_q, log_p, options)


def divergence(
    objective: str, student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, **options: Any
) -> Tensor:
    """Per-position divergence between teacher and student: logits [N, V] (any leading shape) -> [N] float32.

    No masking and no reduction; differentiable in both arguments (kd_loss is the one that stops the
    teacher's gradient). Options as in validate_options.
    """
    resolved = validate_options(objective, **options)
    temperature = check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in shape"
        )
    return resolved_divergence(objective, student_logits, teacher_logits, temperature, resolved)
