"""What the KD tests compare against: random logits, labels and masks of a fixed shape, and the
divergences as independent float64 formulas (textbook definitions, no shared code with core.kd)."""

from __future__ import annotations

import torch

from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX

B, T, V = 2, 5, 11
TEMPERATURE = 1.7
# (objective, options): every objective with its defaults plus non-default options where it has some.
CASES = [
    ("fkl", {}),
    ("rkl", {}),
    ("js", {}),
    ("js", {"beta": 0.2}),
    ("js", {"beta": 0.7, "normalized": True}),
    ("js", {"beta": 1e-3, "normalized": True}),
    ("tvd", {}),
    ("skl", {}),
    ("skl", {"alpha": 0.4}),
    ("srkl", {}),
    ("srkl", {"alpha": 0.3}),
    ("akl", {}),
    ("akl", {"mu": 0.8}),
    ("dpkd", {}),
    ("dpkd", {"beta": 0.5, "label_smoothing": 0.1}),
]
# Objectives that are not divergences: not 0 at p = q (dpkd: log 2 wherever the top tokens agree).
NOT_DIVERGENCES = ("dpkd",)
CASE_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in opts.items()) or 'default'}" for name, opts in CASES]


def random_logits(seed: int, *shape: int, scale: float = 2.5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * scale


def response_mask() -> torch.Tensor:
    """A [B, T] mask of the positions a KD loss counts."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 1:4] = True
    mask[1, 0:5:2] = True  # 6 positions in all, non-contiguous
    return mask


def random_labels() -> torch.Tensor:
    """[B, T + 1] labels with prompt and padding positions ignored (6 response positions after the shift)."""
    generator = torch.Generator().manual_seed(41)
    labels = torch.randint(0, V, (B, T + 1), generator=generator)
    labels[0, :2] = IGNORE_INDEX  # prompt
    labels[1, :3] = IGNORE_INDEX
    labels[1, -1] = IGNORE_INDEX  # padding
    return labels


# -- independent float64 formulas ---------------------------------------------------------------------------
def kl64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    terms = a * (a.log() - b.log())
    return torch.where(a > 0, terms, torch.zeros_like(terms)).sum(-1)  # 0 log 0 = 0


def akl_weights64(p: torch.Tensor, q: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Head / tail weights, row by row in plain Python: head = top tokens up to and including the one
    whose cumulative teacher mass crosses mu."""
    heads, tails = [], []
    for p_row, q_row in zip(p.tolist(), q.tolist(), strict=True):
        order = sorted(range(len(p_row)), key=lambda j: -p_row[j])
        head, mass = set(), 0.0
        for j in order:
            if mass >= mu:
                break
            head.add(j)
            mass += p_row[j]
        g_head = sum(abs(p_row[j] - q_row[j]) for j in head)
        g_tail = sum(abs(p_row[j] - q_row[j]) for j in range(len(p_row)) if j not in head)
        total = g_head + g_tail
        heads.append(g_head / total if total > 0 else 0.0)
        tails.append(g_tail / total if total > 0 else 0.0)
    return torch.tensor(heads, dtype=torch.float64), torch.tensor(tails, dtype=torch.float64)


def dpkd64(p: torch.Tensor, q: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    """DPKD at each position: DPO with the teacher's top token chosen over the student's, the teacher the
    reference (arXiv 2406.19774)."""
    chosen, rejected = p.detach().argmax(-1, keepdim=True), q.detach().argmax(-1, keepdim=True)
    log_ratio = (q.gather(-1, chosen) / q.gather(-1, rejected)).log()
    h = (log_ratio - (p.gather(-1, chosen) / p.gather(-1, rejected)).log()).squeeze(-1)
    sigmoid = torch.sigmoid
    return -(1 - smoothing) * sigmoid(beta * h).log() - smoothing * sigmoid(-beta * h).log()


def reference_divergence(
    objective: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float, **opts
):
    p = torch.softmax(teacher.double() / temperature, dim=-1)
    q = torch.softmax(student.double() / temperature, dim=-1)
    return reference_of_distributions(objective, p, q, **opts)


def reference_of_distributions(objective: str, p: torch.Tensor, q: torch.Tensor, **opts) -> torch.Tensor:
    """The divergence between the teacher's p and the student's q (float64 probabilities, last dim)."""
    if objective == "fkl":
        return kl64(p, q)
    if objective == "rkl":
        return kl64(q, p)
    if objective == "js":
        beta, normalized = opts.get("beta", 0.5), opts.get("normalized", False)
        if normalized and beta in (0.0, 1.0):  # the limits of the normalized form
            return kl64(p, q) if beta == 0.0 else kl64(q, p)
        m = beta * p + (1 - beta) * q
        value = beta * kl64(p, m) + (1 - beta) * kl64(q, m)
        return value / (beta * (1 - beta)) if normalized else value
    if objective == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if objective == "skl":
        alpha = opts.get("alpha", 0.1)
        return kl64(p, alpha * p + (1 - alpha) * q)
    if objective == "srkl":
        alpha = opts.get("alpha", 0.1)
        return kl64(q, (1 - alpha) * p + alpha * q)
    if objective == "dpkd":
        return dpkd64(p, q, opts.get("beta", 0.1), opts.get("label_smoothing", 0.0))
    assert objective == "akl"
    w_head, w_tail = akl_weights64(p.detach(), q.detach(), opts.get("mu", 0.5))
    return w_head * kl64(p, q) + w_tail * kl64(q, p)


def assert_close_to_max(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Relative to the largest entry: gradients hold entries near 0 whose float32 rounding is relative to it."""
    actual, expected = actual.detach().double(), expected.detach().double()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())
