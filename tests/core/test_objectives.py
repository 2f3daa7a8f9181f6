"""KD objectives and losses: per-position values and gradients against float64 formulas, identities,
masking, temperature, dtypes, vocabulary trimming, the chunked paths (closed form and autograd), the
CE + KD mix and option validation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from warmup_distill_kedro.core.kd.divergences import OBJECTIVES, akl_weights, divergence, validate_options
from warmup_distill_kedro.core.kd.losses import KDConfig, distillation_loss, kd_loss
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX

torch.set_num_threads(1)

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
]
CASE_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in opts.items()) or 'default'}" for name, opts in CASES]


def _logits(seed: int, *shape: int, scale: float = 2.5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * scale


# -- independent float64 formulas ---------------------------------------------------------------------------
def _kl64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    terms = a * (a.log() - b.log())
    return torch.where(a > 0, terms, torch.zeros_like(terms)).sum(-1)  # 0 log 0 = 0


def _akl_weights64(p: torch.Tensor, q: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
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


def _reference(objective: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float, **opts):
    p = torch.softmax(teacher.double() / temperature, dim=-1)
    q = torch.softmax(student.double() / temperature, dim=-1)
    if objective == "fkl":
        return _kl64(p, q)
    if objective == "rkl":
        return _kl64(q, p)
    if objective == "js":
        beta, normalized = opts.get("beta", 0.5), opts.get("normalized", False)
        if normalized and beta in (0.0, 1.0):  # the limits of the normalized form
            return _kl64(p, q) if beta == 0.0 else _kl64(q, p)
        m = beta * p + (1 - beta) * q
        value = beta * _kl64(p, m) + (1 - beta) * _kl64(q, m)
        return value / (beta * (1 - beta)) if normalized else value
    if objective == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if objective == "skl":
        alpha = opts.get("alpha", 0.1)
        return _kl64(p, alpha * p + (1 - alpha) * q)
    if objective == "srkl":
        alpha = opts.get("alpha", 0.1)
        return _kl64(q, (1 - alpha) * p + alpha * q)
    assert objective == "akl"
    w_head, w_tail = _akl_weights64(p.detach(), q.detach(), opts.get("mu", 0.5))
    return w_head * _kl64(p, q) + w_tail * _kl64(q, p)


@pytest.mark.parametrize(("objective", "options"), CASES, ids=CASE_IDS)
def test_divergence_value_and_gradient_match_float64_formula(objective, options):
    student, teacher = _logits(0, B * T, V), _logits(1, B * T, V)
    weights = torch.rand(B * T, generator=torch.Generator().manual_seed(2)) + 0.5  # per-row grads, not a sum

    student32 = student.clone().requires_grad_(True)
    value = divergence(objective, student32, teacher, TEMPERATURE, **options)
    (value * weights).sum().backward()

    student64 = student.double().requires_grad_(True)
    expected = _reference(objective, student64, teacher, TEMPERATURE, **options)
    (expected * weights.double()).sum().backward()

    assert value.dtype == torch.float32 and value.shape == (B * T,)
    assert expected.min() > 1e-3  # the inputs are far enough apart for the comparison to mean something
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert student32.grad.abs().max() > 1e-3
    torch.testing.assert_close(student32.grad.double(), student64.grad, rtol=1e-4, atol=1e-6)


def test_the_temperature_changes_the_value():
    student, teacher = _logits(0, 4, V), _logits(1, 4, V)
    at_one = divergence("fkl", student, teacher)
    at_t = divergence("fkl", student, teacher, TEMPERATURE)
    torch.testing.assert_close(at_t, divergence("fkl", student / TEMPERATURE, teacher / TEMPERATURE))
    assert (at_one - at_t).abs().min() > 1e-3


# -- identities ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("objective", "options"), CASES, ids=CASE_IDS)
def test_zero_at_equal_distributions_and_positive_elsewhere(objective, options):
    logits = _logits(3, 6, V).requires_grad_(True)
    same = divergence(objective, logits, logits.detach().clone(), TEMPERATURE, **options)
    assert same.abs().max() < 1e-6
    same.sum().backward()
    assert logits.grad.abs().max() < 1e-6  # p == q is the minimum: no pull either way
    apart = divergence(objective, _logits(4, 50, V), _logits(5, 50, V), TEMPERATURE, **options)
    assert torch.isfinite(apart).all() and apart.min() > 0


def test_bounds():
    student, teacher = _logits(6, 50, V, scale=6.0), _logits(7, 50, V, scale=6.0)
    tvd = divergence("tvd", student, teacher)
    assert tvd.max() <= 1.0 and tvd.max() > 0.5  # sharp random distributions get close to the bound
    js = divergence("js", student, teacher)
    assert js.max() <= torch.log(torch.tensor(2.0)) + 1e-6


def test_symmetries():
    s, t = _logits(8, 10, V), _logits(9, 10, V)
    torch.testing.assert_close(divergence("js", s, t), divergence("js", t, s))
    torch.testing.assert_close(divergence("js", s, t, beta=0.3), divergence("js", t, s, beta=0.7))
    torch.testing.assert_close(divergence("tvd", s, t), divergence("tvd", t, s))
    torch.testing.assert_close(divergence("rkl", s, t), divergence("fkl", t, s))
    # ...and the test can tell them apart: KL is not symmetric, a skewed js is not either.
    assert (divergence("fkl", s, t) - divergence("rkl", s, t)).abs().max() > 1e-2
    assert (divergence("js", s, t, beta=0.3) - divergence("js", t, s, beta=0.3)).abs().max() > 1e-3


def test_js_normalization_and_its_endpoints():
    s, t = _logits(10, 10, V, scale=1.0), _logits(11, 10, V, scale=1.0)
    fkl, rkl = divergence("fkl", s, t, 1.3), divergence("rkl", s, t, 1.3)
    assert torch.equal(divergence("js", s, t, 1.3, beta=0.0, normalized=True), fkl)
    assert torch.equal(divergence("js", s, t, 1.3, beta=1.0, normalized=True), rkl)
    # Continuous at the endpoints: the normalized value tends to fkl / rkl, O(beta) away from them.
    for beta, rtol in [(1e-3, 1e-2), (1e-4, 1e-3)]:
        near_fkl = divergence("js", s, t, 1.3, beta=beta, normalized=True)
        near_rkl = divergence("js", s, t, 1.3, beta=1 - beta, normalized=True)
        torch.testing.assert_close(near_fkl, fkl, rtol=rtol, atol=1e-6)
        torch.testing.assert_close(near_rkl, rkl, rtol=rtol, atol=1e-6)
    # ...and float32 keeps the O(beta^2) mixture term accurate that close to them.
    for beta in (1e-6, 1 - 1e-6):
        expected = _reference("js", s, t, 1.3, beta=beta, normalized=True)
        got = divergence("js", s, t, 1.3, beta=beta, normalized=True).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    plain = divergence("js", s, t, 1.3, beta=0.3)
    torch.testing.assert_close(divergence("js", s, t, 1.3, beta=0.3, normalized=True), plain / (0.3 * 0.7))


def test_skews_at_zero_are_the_plain_kls():
    s, t = _logits(12, 10, V), _logits(13, 10, V)
    assert torch.equal(divergence("skl", s, t, 1.3, alpha=0.0), divergence("fkl", s, t, 1.3))
    assert torch.equal(divergence("srkl", s, t, 1.3, alpha=0.0), divergence("rkl", s, t, 1.3))
    # A skew bounds the log-ratio: skl < fkl once alpha > 0.
    assert (divergence("skl", s, t, 1.3) < divergence("fkl", s, t, 1.3)).all()


def test_akl_mu_extremes():
    s, t = _logits(14, 10, V), _logits(15, 10, V)
    fkl, rkl = divergence("fkl", s, t), divergence("rkl", s, t)
    # mu near 1: every token is in the head (the smallest teacher prob is far above 1e-6): akl is fkl.
    torch.testing.assert_close(divergence("akl", s, t, mu=1 - 1e-6), fkl)
    # mu tiny: the head is the teacher's top token alone.
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    top = p.argmax(-1, keepdim=True)
    gap = (p - q).abs()
    w_head = gap.gather(-1, top).squeeze(-1) / gap.sum(-1)
    expected = w_head * fkl.double() + (1 - w_head) * rkl.double()
    torch.testing.assert_close(divergence("akl", s, t, mu=1e-6).double(), expected, rtol=1e-5, atol=1e-6)
    assert (w_head > 0.05).all() and (w_head < 0.95).all()  # a real mix of the two


def test_akl_head_includes_the_token_crossing_mu():
    p = torch.tensor([[0.3, 0.3, 0.2, 0.1, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2]], dtype=torch.float64)
    s, t = q.log().float(), p.log().float()
    # mu = 0.5: cumulative masses 0.3, 0.6 -> the head is tokens 0 and 1 (token 1 crosses 0.5).
    w_head = (0.2 + 0.1) / (0.2 + 0.1 + 0.1 + 0.1 + 0.1)
    expected = w_head * _kl64(p, q) + (1 - w_head) * _kl64(q, p)
    torch.testing.assert_close(divergence("akl", s, t, mu=0.5).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mu", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0, 12.0])
def test_akl_head_matches_the_sorted_definition_at_large_vocabularies(mu, scale):
    """akl_weights finds the head by bisection, not by sorting: it must pick the same tokens as the sorted
    definition (top tokens until and including the one crossing mu) on flat and peaked rows alike."""
    p = torch.softmax(_logits(70, 6, 5000, scale=scale), dim=-1)
    q = torch.softmax(_logits(71, 6, 5000, scale=scale), dim=-1)
    p64, q64 = p.double(), q.double()
    order = p64.argsort(dim=-1, descending=True)
    mass_before = p64.gather(-1, order).cumsum(dim=-1) - p64.gather(-1, order)
    head = torch.zeros_like(p64, dtype=torch.bool).scatter(-1, order, mass_before < mu)
    gap = (p64 - q64).abs()
    expected_head = (gap * head).sum(-1) / gap.sum(-1)
    w_head, w_tail = akl_weights(p, q, mu)
    assert 0 < expected_head.min() and expected_head.max() < 1  # heads and tails both hold some gap
    torch.testing.assert_close(w_head.double(), expected_head, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w_tail.double(), 1 - expected_head, rtol=1e-5, atol=1e-7)


def test_akl_head_takes_every_token_tied_with_the_crossing_one():
    """Ties with the crossing token join the head together, whatever order a sort would put them in:
    the weights do not change when the vocabulary is permuted."""
    p = torch.tensor([[0.4, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.3, 0.5, 0.1]])
    w_head, w_tail = akl_weights(p, q, 0.5)  # cumulative 0.4 then 0.6: the 0.2s cross mu together
    assert w_head.item() == pytest.approx(1.0) and w_tail.item() == pytest.approx(0.0)
    w_head, w_tail = akl_weights(p, q, 0.3)  # the 0.4 alone crosses 0.3
    assert w_head.item() == pytest.approx(0.3 / 0.8) and w_tail.item() == pytest.approx(
        0.5 / 0.8
    )  # gaps .3 .1 .3 .1
    permutation = torch.tensor([2, 0, 3, 1])
    assert torch.equal(akl_weights(p[:, permutation], q[:, permutation], 0.5)[0], akl_weights(p, q, 0.5)[0])


def test_akl_guard_when_the_gap_is_zero():
    logits = _logits(16, 3, V)
    value = divergence("akl", logits, logits.clone(), mu=0.5)
    assert torch.equal(value, torch.zeros(3))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_zero_probability_tokens_give_no_nan(objective):
    student, teacher = _logits(17, 4, V), _logits(18, 4, V)
    student[:, :3] = float("-inf")  # tokens neither model can produce
    teacher[:, :3] = float("-inf")
    student.requires_grad_(True)
    value = divergence(objective, student, teacher)
    value.sum().backward()
    assert torch.isfinite(value).all() and value.min() > 0
    assert torch.isfinite(student.grad).all() and (student.grad[:, :3] == 0).all()
    same = divergence(objective, teacher, teacher.clone())
    assert torch.equal(same, torch.zeros(4))
    # Teacher-only zeros: fkl stays finite and exact (p log p with p = 0 is 0).
    torch.testing.assert_close(
        divergence("fkl", student.detach().clone().fill_(0.5), teacher).double(),
        _kl64(torch.softmax(teacher.double(), -1), torch.full((4, V), 1.0 / V, dtype=torch.float64)),
        rtol=1e-5,
        atol=1e-6,
    )


# -- kd_loss: masking, temperature, dtypes, vocabulary ------------------------------------------------------
def _mask() -> torch.Tensor:
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 1:4] = True
    mask[1, 0:5:2] = True  # 6 positions in all, non-contiguous
    return mask


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_masked_out_positions_do_not_count(objective, chunk_size):
    student, teacher, mask = _logits(19, B, T, V), _logits(20, B, T, V), _mask()
    clean = student.clone().requires_grad_(True)
    value = kd_loss(objective, clean, teacher, mask, TEMPERATURE, chunk_size)
    value.backward()
    expected = divergence(objective, student[mask], teacher[mask], TEMPERATURE).mean()
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)

    noisy_student, noisy_teacher = student.clone(), teacher.clone()
    noisy_student[~mask] = _logits(21, int((~mask).sum()), V, scale=1e4)
    noisy_teacher[~mask] = _logits(22, int((~mask).sum()), V, scale=1e4)
    noisy_student.requires_grad_(True)
    noisy = kd_loss(objective, noisy_student, noisy_teacher, mask, TEMPERATURE, chunk_size)
    noisy.backward()
    assert torch.equal(noisy, value)
    assert (noisy_student.grad[~mask] == 0).all()
    assert torch.equal(noisy_student.grad, clean.grad)
    assert clean.grad[mask].abs().max() > 1e-4


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_all_masked_is_zero_with_a_graph(chunk_size):
    student = _logits(23, B, T, V).requires_grad_(True)
    value = kd_loss("js", student, _logits(24, B, T, V), torch.zeros(B, T, dtype=torch.bool), 2.0, chunk_size)
    assert value.item() == 0.0 and value.dtype == torch.float32 and value.requires_grad
    value.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_kd_temperature_is_a_logit_scale(chunk_size):
    student, teacher, mask = _logits(25, B, T, V), _logits(26, B, T, V), _mask()
    at_t = kd_loss("srkl", student, teacher, mask, TEMPERATURE, chunk_size)
    scaled = kd_loss("srkl", student / TEMPERATURE, teacher / TEMPERATURE, mask, 1.0, chunk_size)
    torch.testing.assert_close(at_t, scaled)
    assert abs(at_t.item() - kd_loss("srkl", student, teacher, mask, 1.0, chunk_size).item()) > 1e-3


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("objective", ["fkl", "js", "akl"])
def test_bf16_inputs_are_computed_in_float32(objective, chunk_size):
    student16 = _logits(27, B, T, V).bfloat16().requires_grad_(True)
    teacher16 = _logits(28, B, T, V).bfloat16()
    student32 = student16.detach().float().requires_grad_(True)
    mask = _mask()
    value16 = kd_loss(objective, student16, teacher16, mask, TEMPERATURE, chunk_size)
    value32 = kd_loss(objective, student32, teacher16.float(), mask, TEMPERATURE, chunk_size)
    assert value16.dtype == torch.float32
    # The upcast is exact, so the result is the float32 one (a bf16 computation would be off by ~1e-2).
    torch.testing.assert_close(value16, value32, rtol=1e-6, atol=1e-7)
    value16.backward()
    value32.backward()
    assert student16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(student16.grad.float(), student32.grad, rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_vocab_size_drops_padding_columns(chunk_size):
    student, teacher, mask = _logits(29, B, T, V), _logits(30, B, T, V), _mask()
    reference = kd_loss("fkl", student, teacher, mask, 2.0, chunk_size)
    padded_student = torch.cat([student, _logits(31, B, T, 2, scale=50.0)], dim=-1).requires_grad_(True)
    padded_teacher = torch.cat([teacher, _logits(32, B, T, 4, scale=50.0)], dim=-1)
    trimmed = kd_loss("fkl", padded_student, padded_teacher, mask, 2.0, chunk_size, vocab_size=V)
    torch.testing.assert_close(trimmed, reference, rtol=1e-6, atol=1e-7)
    trimmed.backward()
    assert (padded_student.grad[..., V:] == 0).all() and padded_student.grad[..., :V].abs().max() > 1e-4
    # Without trimming the extra columns would matter:
    untrimmed = kd_loss("fkl", padded_student[..., : V + 2], padded_teacher[..., : V + 2], mask, 2.0)
    assert abs(untrimmed.item() - reference.item()) > 1e-2

    with pytest.raises(ValueError, match=rf"{V + 2}.*{V + 4}.*vocab_size"):
        kd_loss("fkl", padded_student, padded_teacher, mask, 2.0, chunk_size)
    with pytest.raises(ValueError, match="vocab_size 14 exceeds"):
        kd_loss("fkl", padded_student, padded_teacher, mask, 2.0, chunk_size, vocab_size=V + 3)


def test_teacher_gets_no_gradient():
    student = _logits(33, B, T, V).requires_grad_(True)
    teacher = _logits(34, B, T, V).requires_grad_(True)
    for chunk_size in (None, 3):
        kd_loss("js", student, teacher, _mask(), 2.0, chunk_size).backward()
    assert teacher.grad is None and student.grad is not None


def test_kd_loss_input_errors():
    student, teacher, mask = _logits(35, B, T, V), _logits(36, B, T, V), _mask()
    with pytest.raises(ValueError, match="mask must be a bool"):
        kd_loss("fkl", student, teacher, mask.long())
    with pytest.raises(ValueError, match="mask"):
        kd_loss("fkl", student, teacher, mask[:, :-1])
    with pytest.raises(ValueError, match="leading"):
        kd_loss("fkl", student, teacher[:, :-1], mask)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss("fkl", student, teacher, mask, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        kd_loss("fkl", student, teacher, mask, chunk_size=0)
    with pytest.raises(ValueError, match="shape"):
        divergence("fkl", student[0], teacher[0, :, :-1])


# -- the chunked path ---------------------------------------------------------------------------------------
def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("chunk_size", [1, 3, 64, None])
@pytest.mark.parametrize(("objective", "options"), CASES, ids=CASE_IDS)
def test_chunked_equals_unchunked(objective, options, chunk_size):
    """kd_loss (closed form or autograd chunk by chunk) against autograd through the whole masked rows."""
    student, teacher, mask = _logits(37, B, T, V), _logits(38, B, T, V), _mask()
    direct_student = student.clone().requires_grad_(True)
    chunked_student = student.clone().requires_grad_(True)
    direct = divergence(objective, direct_student[mask], teacher[mask], TEMPERATURE, **options).mean()
    chunked = kd_loss(objective, chunked_student, teacher, mask, TEMPERATURE, chunk_size, **options)
    # A non-unit upstream gradient (as from kd_rate) must scale the chunked gradient too.
    (0.37 * direct).backward()
    (0.37 * chunked).backward()
    assert chunked.dtype == torch.float32 and chunked.dim() == 0
    assert _rel_diff(chunked, direct) < 1e-5
    assert _rel_diff(chunked_student.grad, direct_student.grad) < 1e-5
    assert direct_student.grad.abs().max() > 1e-4


def test_chunked_without_grad_gives_the_value():
    student, teacher, mask = _logits(39, B, T, V).requires_grad_(True), _logits(40, B, T, V), _mask()
    with torch.no_grad():
        value = kd_loss("akl", student, teacher, mask, 2.0, 2)
    assert not value.requires_grad
    torch.testing.assert_close(value, kd_loss("akl", student, teacher, mask, 2.0).detach())


# -- distillation_loss --------------------------------------------------------------------------------------
def _labels() -> torch.Tensor:
    generator = torch.Generator().manual_seed(41)
    labels = torch.randint(0, V, (B, T + 1), generator=generator)
    labels[0, :2] = IGNORE_INDEX  # prompt
    labels[1, :3] = IGNORE_INDEX
    labels[1, -1] = IGNORE_INDEX  # padding
    return labels


def _ce64(student: torch.Tensor, labels: torch.Tensor) -> float:
    targets = labels[:, 1:].flatten()
    logits = student[:, :-1].flatten(0, 1).double()
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX).item()


def test_distillation_loss_mixes_ce_and_kd():
    labels = _labels()
    student, teacher = _logits(42, B, T + 1, V), _logits(43, B, T + 1, V)
    response = labels[:, 1:] != IGNORE_INDEX  # 4 + 2 positions
    ce = _ce64(student, labels)
    # Independently: the mean over the response positions of the shifted logits' divergence.
    kd = divergence("js", student[:, :-1][response], teacher[:, :-1][response], 2.0, beta=0.3).double().mean()

    only_ce, metrics = distillation_loss(
        student, teacher, labels, KDConfig(objective="js", kd_rate=0.0, options={"beta": 0.3})
    )
    assert only_ce.item() == pytest.approx(ce, rel=1e-6)
    assert set(metrics) == {"loss", "ce", "kd", "tokens"}
    assert metrics["tokens"] == 6.0 == float(response.sum())
    assert metrics["ce"] == pytest.approx(ce, rel=1e-6) and metrics["loss"] == pytest.approx(ce, rel=1e-6)
    assert metrics["kd"] == pytest.approx(kd.item(), rel=1e-5)

    config = KDConfig(objective="js", kd_rate=1.0, options={"beta": 0.3})
    only_kd, metrics = distillation_loss(student, teacher, labels, config)
    assert only_kd.item() == pytest.approx(kd.item(), rel=1e-5)
    direct = kd_loss("js", student[:, :-1], teacher[:, :-1], response, 2.0, beta=0.3)
    assert only_kd.item() == pytest.approx(direct.item(), rel=1e-6)
    assert metrics["loss"] == pytest.approx(kd.item(), rel=1e-5) and metrics["ce"] == pytest.approx(
        ce, rel=1e-6
    )
    assert abs(ce - kd.item()) > 1e-2  # the two terms are told apart

    for chunk_size in (None, 4):
        mixed_student = student.clone().requires_grad_(True)
        config = KDConfig(objective="js", kd_rate=0.3, options={"beta": 0.3}, chunk_size=chunk_size)
        mixed, metrics = distillation_loss(mixed_student, teacher, labels, config)
        assert mixed.item() == pytest.approx(0.7 * ce + 0.3 * kd.item(), rel=1e-5)
        mixed.backward()
        assert (mixed_student.grad[:, -1] == 0).all()  # the last position predicts nothing
        assert (mixed_student.grad[0, :1] == 0).all() and (mixed_student.grad[1, :2] == 0).all()  # prompt


def test_distillation_loss_passes_vocab_size():
    labels = _labels()
    student, teacher = _logits(44, B, T + 1, V), _logits(45, B, T + 1, V + 5)
    config = KDConfig(objective="fkl", kd_rate=1.0)
    with pytest.raises(ValueError, match="vocab_size"):
        distillation_loss(student, teacher, labels, config)
    trimmed, _ = distillation_loss(student, teacher, labels, config, vocab_size=V)
    expected, _ = distillation_loss(student, teacher[..., :V], labels, config)
    assert trimmed.item() == pytest.approx(expected.item(), rel=1e-6)


# -- options and config -------------------------------------------------------------------------------------
def test_validate_options_fills_defaults():
    assert validate_options("fkl") == {}
    assert validate_options("js") == {"beta": 0.5, "normalized": False}
    assert validate_options("js", beta=0, normalized=True) == {"beta": 0.0, "normalized": True}
    assert validate_options("skl") == {"alpha": 0.1} == validate_options("srkl")
    assert validate_options("srkl", alpha=0) == {"alpha": 0.0}
    assert validate_options("akl", mu=0.9) == {"mu": 0.9}


def test_validate_options_errors():
    with pytest.raises(ValueError, match="unknown KD objective 'kl'.*fkl, rkl, js, tvd, skl, srkl, akl"):
        validate_options("kl")
    with pytest.raises(ValueError, match=r"'beta'.*\(0, 1\).*'fkl'.*normalized=True"):
        validate_options("js", beta=0.0)
    with pytest.raises(ValueError, match=r"'beta'.*'rkl'.*normalized=True"):
        validate_options("js", beta=1.0)
    with pytest.raises(ValueError, match=r"'beta'.*\[0, 1\]"):
        validate_options("js", beta=1.5, normalized=True)
    with pytest.raises(ValueError, match=r"'beta'.*\(0, 1\)"):
        validate_options("js", beta=-0.2)
    with pytest.raises(ValueError, match="'normalized'"):
        validate_options("js", normalized=1.0)
    for objective in ("skl", "srkl"):
        with pytest.raises(ValueError, match=rf"{objective} option 'alpha' must be in \[0, 1\)"):
            validate_options(objective, alpha=1.0)
    with pytest.raises(ValueError, match=r"'mu'.*\(0, 1\)"):
        validate_options("akl", mu=1.0)
    with pytest.raises(ValueError, match="'mu' must be a number"):
        validate_options("akl", mu=True)
    with pytest.raises(ValueError, match="unknown option 'beta' for KD objective 'akl'; it accepts: mu"):
        validate_options("akl", beta=0.5)
    with pytest.raises(ValueError, match="unknown option 'alpha'.*'fkl'; it takes no options"):
        validate_options("fkl", alpha=0.1)
    with pytest.raises(ValueError, match="unknown option 'beta'"):
        divergence("tvd", torch.zeros(1, 3), torch.zeros(1, 3), beta=0.5)


def test_kd_config():
    config = KDConfig()
    assert (config.objective, config.temperature, config.kd_rate, config.options, config.chunk_size) == (
        "fkl",
        2.0,
        0.5,
        {},
        None,
    )
    assert KDConfig(objective="js").options == {"beta": 0.5, "normalized": False}
    assert KDConfig(objective="js", options={"beta": 1, "normalized": True}).options == {
        "beta": 1.0,
        "normalized": True,
    }
    with pytest.raises(ValidationError, match="fkl, rkl, js, tvd, skl, srkl, akl"):
        KDConfig(objective="reverse_kl")
    with pytest.raises(ValidationError, match="normalized=True"):
        KDConfig(objective="js", options={"beta": 0.0})
    with pytest.raises(ValidationError, match="alpha"):
        KDConfig(objective="skl", options={"alpha": 1.0})
    with pytest.raises(ValidationError, match="unknown option 'mu'"):
        KDConfig(objective="skl", options={"mu": 0.5})
    for bad in ({"temperature": 0.0}, {"kd_rate": 1.5}, {"chunk_size": 0}, {"objectve": "fkl"}):
        with pytest.raises(ValidationError):
            KDConfig(**bad)


# -- the closed forms (value, CE and the student's gradient in one chunked pass) -----------------------------
def _mix64(student, teacher, labels, objective, options, temperature, kd_rate, vocab):
    """(1 - kd_rate) CE over the student's full width + kd_rate KD over the first `vocab` columns, float64."""
    student = student.double()
    targets = labels[:, 1:]
    response = targets != IGNORE_INDEX
    shifted = student[:, :-1][response]
    ce = torch.nn.functional.cross_entropy(shifted, targets[response], reduction="mean")
    teacher_rows = teacher[:, :-1][response][:, :vocab]
    kd = _reference(objective, shifted[:, :vocab], teacher_rows, temperature, **options).mean()
    return (1.0 - kd_rate) * ce + kd_rate * kd


# Each objective's closed form, at its options' ends too: skl / srkl at alpha 0 and normalized js at beta
# 0 and 1 take the fkl / rkl forms.
CLOSED_FORM_CASES = [
    *CASES,
    ("skl", {"alpha": 0.0}),
    ("srkl", {"alpha": 0.0}),
    ("srkl", {"alpha": 0.9}),
    ("js", {"beta": 0.0, "normalized": True}),
    ("js", {"beta": 1.0, "normalized": True}),
    ("js", {"beta": 0.999, "normalized": True}),
]
CLOSED_FORM_IDS = [
    f"{name}-{'-'.join(f'{k}={v}' for k, v in opts.items()) or 'default'}" for name, opts in CLOSED_FORM_CASES
]


@pytest.mark.parametrize(("objective", "options"), CLOSED_FORM_CASES, ids=CLOSED_FORM_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 1.7])
@pytest.mark.parametrize("kd_rate", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(("extra_columns", "chunk_size"), [(0, None), (3, None), (0, 2), (3, 4)])
def test_closed_form_matches_float64_value_and_gradient(
    objective, options, temperature, kd_rate, extra_columns, chunk_size
):
    """Every branch of the closed form (T = 1 and 2 reuse q's exponentials for CE; a wider student vocabulary
    does not; kd_rate 0 and 1 drop a term) against float64 autograd on the textbook formulas."""
    labels = _labels()
    student = _logits(60, B, T + 1, V + extra_columns)
    teacher = _logits(61, B, T + 1, V)
    expected_student = student.double().requires_grad_(True)
    expected = _mix64(expected_student, teacher.double(), labels, objective, options, temperature, kd_rate, V)
    expected.backward()

    student32 = student.clone().requires_grad_(True)
    config = KDConfig(
        objective=objective, options=options, kd_rate=kd_rate, temperature=temperature, chunk_size=chunk_size
    )
    loss, metrics = distillation_loss(student32, teacher, labels, config, vocab_size=V)
    (2.0 * loss).backward()  # a non-unit upstream gradient scales the precomputed one

    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["tokens"] == 6.0
    torch.testing.assert_close(student32.grad.double(), 2.0 * expected_student.grad, rtol=1e-4, atol=1e-6)
    assert student32.grad.abs().max() > 1e-3


@pytest.mark.parametrize(("objective", "options"), CLOSED_FORM_CASES, ids=CLOSED_FORM_IDS)
@pytest.mark.parametrize(("spread", "grad_rtol"), [(1e-2, 1e-4), (1e-3, 1e-3)])
def test_closed_form_keeps_small_divergences(objective, options, spread, grad_rtol):
    """Student and teacher close together: the divergences are O(spread^2) (tvd O(spread)), far below
    float32's resolution of O(1) log-probabilities, so a value can only be right to about 1e-7 absolute
    (autograd through the formulas does no better); the gradient, O(spread), must keep its relative
    precision: the mixtures' log-ratios come through log1p / expm1, and the constant part of q / m drops
    out before the centring (without that, srkl at alpha 0.9 lost two digits)."""
    teacher = _logits(64, B, T, V)
    student = teacher + spread * _logits(65, B, T, V, scale=1.0)
    mask = torch.ones(B, T, dtype=torch.bool)
    closed = student.clone().requires_grad_(True)
    value = kd_loss(objective, closed, teacher, mask, TEMPERATURE, **options)
    value.backward()
    expected_student = student.double().requires_grad_(True)
    rows = (expected_student.flatten(0, 1), teacher.double().flatten(0, 1))
    expected = _reference(objective, *rows, TEMPERATURE, **options).mean()
    expected.backward()
    assert 0 < expected.item() < 100 * spread
    assert value.item() == pytest.approx(expected.item(), abs=1e-7)
    assert _rel_diff(closed.grad.double(), expected_student.grad) < grad_rtol


@pytest.mark.parametrize(("objective", "options"), CASES, ids=CASE_IDS)
def test_closed_form_falls_back_to_autograd_for_minus_infinity_logits(objective, options):
    """A student logit of -inf (a masked token) reaches the log floor, where the closed form's gradient
    would differ from the clamp's: that chunk goes through autograd and still matches the masked formula."""
    student, teacher, mask = _logits(62, B, T, V), _logits(63, B, T, V), _mask()
    student[..., 0] = float("-inf")
    teacher[..., 0] = -1e4  # the teacher agrees the token is impossible, so KL stays finite
    closed = student.clone().requires_grad_(True)
    kd_loss(objective, closed, teacher, mask, 1.0, **options).backward()
    assert torch.isfinite(closed.grad).all() and (closed.grad[..., 0] == 0).all()
    finite = student[..., 1:].clone().requires_grad_(True)
    kd_loss(objective, finite, teacher[..., 1:], mask, 1.0, **options).backward()
    torch.testing.assert_close(closed.grad[..., 1:], finite.grad, rtol=1e-4, atol=1e-6)
