"""core/kd/divergences.py: every objective's per-position value and gradient against float64 formulas,
identities, bounds and symmetries, akl's head and tail, zero-probability tokens, and option validation."""

from __future__ import annotations

import math

import pytest
import torch

from tests.core.kd.reference import (
    CASE_IDS,
    CASES,
    NOT_DIVERGENCES,
    TEMPERATURE,
    B,
    T,
    V,
    kl64,
    random_logits,
    reference_divergence,
)
from warmup_distill_kedro.core.kd.divergences import OBJECTIVES, akl_weights, divergence, validate_options
from warmup_distill_kedro.core.kd.losses import kd_loss

torch.set_num_threads(1)


@pytest.mark.parametrize(("objective", "options"), CASES, ids=CASE_IDS)
def test_divergence_value_and_gradient_match_float64_formula(objective, options):
    student, teacher = random_logits(0, B * T, V), random_logits(1, B * T, V)
    weights = torch.rand(B * T, generator=torch.Generator().manual_seed(2)) + 0.5  # per-row grads, not a sum

    student32 = student.clone().requires_grad_(True)
    value = divergence(objective, student32, teacher, TEMPERATURE, **options)
    (value * weights).sum().backward()

    student64 = student.double().requires_grad_(True)
    expected = reference_divergence(objective, student64, teacher, TEMPERATURE, **options)
    (expected * weights.double()).sum().backward()

    assert value.dtype == torch.float32 and value.shape == (B * T,)
    assert expected.min() > 1e-3  # the inputs are far enough apart for the comparison to mean something
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert student32.grad.abs().max() > 1e-3
    torch.testing.assert_close(student32.grad.double(), student64.grad, rtol=1e-4, atol=1e-6)


def test_the_temperature_changes_the_value():
    student, teacher = random_logits(0, 4, V), random_logits(1, 4, V)
    at_one = divergence("fkl", student, teacher)
    at_t = divergence("fkl", student, teacher, TEMPERATURE)
    torch.testing.assert_close(at_t, divergence("fkl", student / TEMPERATURE, teacher / TEMPERATURE))
    assert (at_one - at_t).abs().min() > 1e-3


# -- identities ---------------------------------------------------------------------------------------------
DIVERGENCES = [case for case in CASES if case[0] not in NOT_DIVERGENCES]


@pytest.mark.parametrize(
    ("objective", "options"),
    DIVERGENCES,
    ids=[i for i, c in zip(CASE_IDS, CASES, strict=True) if c in DIVERGENCES],
)
def test_zero_at_equal_distributions_and_positive_elsewhere(objective, options):
    logits = random_logits(3, 6, V).requires_grad_(True)
    same = divergence(objective, logits, logits.detach().clone(), TEMPERATURE, **options)
    assert same.abs().max() < 1e-6
    same.sum().backward()
    assert logits.grad.abs().max() < 1e-6  # p == q is the minimum: no pull either way
    apart = divergence(objective, random_logits(4, 50, V), random_logits(5, 50, V), TEMPERATURE, **options)
    assert torch.isfinite(apart).all() and apart.min() > 0


def test_bounds():
    student, teacher = random_logits(6, 50, V, scale=6.0), random_logits(7, 50, V, scale=6.0)
    tvd = divergence("tvd", student, teacher)
    assert tvd.max() <= 1.0 and tvd.max() > 0.5  # sharp random distributions get close to the bound
    js = divergence("js", student, teacher)
    assert js.max() <= torch.log(torch.tensor(2.0)) + 1e-6


def test_symmetries():
    s, t = random_logits(8, 10, V), random_logits(9, 10, V)
    torch.testing.assert_close(divergence("js", s, t), divergence("js", t, s))
    torch.testing.assert_close(divergence("js", s, t, beta=0.3), divergence("js", t, s, beta=0.7))
    torch.testing.assert_close(divergence("tvd", s, t), divergence("tvd", t, s))
    torch.testing.assert_close(divergence("rkl", s, t), divergence("fkl", t, s))
    # ...and the test can tell them apart: KL is not symmetric, a skewed js is not either.
    assert (divergence("fkl", s, t) - divergence("rkl", s, t)).abs().max() > 1e-2
    assert (divergence("js", s, t, beta=0.3) - divergence("js", t, s, beta=0.3)).abs().max() > 1e-3


def test_js_normalization_and_its_endpoints():
    s, t = random_logits(10, 10, V, scale=1.0), random_logits(11, 10, V, scale=1.0)
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
        expected = reference_divergence("js", s, t, 1.3, beta=beta, normalized=True)
        got = divergence("js", s, t, 1.3, beta=beta, normalized=True).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    plain = divergence("js", s, t, 1.3, beta=0.3)
    torch.testing.assert_close(divergence("js", s, t, 1.3, beta=0.3, normalized=True), plain / (0.3 * 0.7))


def test_skews_at_zero_are_the_plain_kls():
    s, t = random_logits(12, 10, V), random_logits(13, 10, V)
    assert torch.equal(divergence("skl", s, t, 1.3, alpha=0.0), divergence("fkl", s, t, 1.3))
    assert torch.equal(divergence("srkl", s, t, 1.3, alpha=0.0), divergence("rkl", s, t, 1.3))
    # A skew bounds the log-ratio: skl < fkl once alpha > 0.
    assert (divergence("skl", s, t, 1.3) < divergence("fkl", s, t, 1.3)).all()


def test_akl_mu_extremes():
    s, t = random_logits(14, 10, V), random_logits(15, 10, V)
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
    expected = w_head * kl64(p, q) + (1 - w_head) * kl64(q, p)
    torch.testing.assert_close(divergence("akl", s, t, mu=0.5).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mu", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0, 12.0])
def test_akl_head_matches_the_sorted_definition_at_large_vocabularies(mu, scale):
    """akl_weights finds the head by bisection, not by sorting: it must pick the same tokens as the sorted
    definition (top tokens until and including the one crossing mu) on flat and peaked rows alike."""
    p = torch.softmax(random_logits(70, 6, 5000, scale=scale), dim=-1)
    q = torch.softmax(random_logits(71, 6, 5000, scale=scale), dim=-1)
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


def _get_ratio64(p: torch.Tensor, q: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The AKL authors' get_ratio, in float64: sort descending, the tail is where the cumulative mass
    exceeds mu (so the crossing token is in the tail), the top token always in the head."""
    p_sorted, order = p.double().sort(dim=-1, descending=True)
    errors = (p_sorted - q.double().gather(-1, order)).abs()
    tail = p_sorted.cumsum(dim=-1) > mu
    tail[:, 0] = False
    s1, s2 = errors.masked_fill(tail, 0.0).sum(-1), errors.masked_fill(~tail, 0.0).sum(-1)
    return s1 / (s1 + s2), s2 / (s1 + s2)


@pytest.mark.parametrize("mu", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0, 12.0])
def test_akl_crossing_tail_is_the_akl_codes_head(mu, scale):
    """crossing: tail reproduces AKL's get_ratio on rows without ties, flat (bisection) and peaked (top-k)."""
    p = torch.softmax(random_logits(72, 6, 5000, scale=scale), dim=-1)
    q = torch.softmax(random_logits(73, 6, 5000, scale=scale), dim=-1)
    expected_head, expected_tail = _get_ratio64(p, q, mu)
    w_head, w_tail = akl_weights(p, q, mu, crossing="tail")
    torch.testing.assert_close(w_head.double(), expected_head, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w_tail.double(), expected_tail, rtol=1e-5, atol=1e-7)


def test_akl_crossing_puts_the_crossing_token_in_the_head_or_the_tail():
    p = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1], [0.7, 0.1, 0.1, 0.05, 0.05], [0.3, 0.3, 0.2, 0.1, 0.1]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2, 0.2], [0.1, 0.2, 0.3, 0.2, 0.2]])
    gap = (p - q).abs()
    # mu 0.5: row 0 crosses at a 0.2 (0.4 + 0.2), tied with the next 0.2; row 1 at its top token (0.7);
    # row 2 at its second 0.3, tied with the top token
    head, _ = akl_weights(p, q, 0.5, crossing="head")
    tail, _ = akl_weights(p, q, 0.5, crossing="tail")
    expected_head = torch.stack([gap[0, :3].sum(), gap[1, :1].sum(), gap[2, :2].sum()]) / gap.sum(-1)
    torch.testing.assert_close(head, expected_head)  # the crossing token and its ties in the head
    # tail: row 0's crossing 0.2 and its tie leave the head; the top token stays in the head, with its
    # ties (row 2: a sort would keep one 0.3 of two, by its order)
    expected_tail = torch.stack([gap[0, :1].sum(), gap[1, :1].sum(), gap[2, :2].sum()]) / gap.sum(-1)
    torch.testing.assert_close(tail, expected_tail)
    assert divergence("akl", q.log(), p.log(), crossing="tail").shape == (3,)


def test_akl_is_the_same_in_the_chunked_closed_form_with_either_crossing():
    student, teacher = random_logits(74, 24, 700, scale=3.0), random_logits(75, 24, 700, scale=3.0)
    mask = torch.ones(24, dtype=torch.bool)
    for crossing in ("head", "tail"):
        expected = divergence("akl", student, teacher, 2.0, crossing=crossing).mean()
        got = kd_loss("akl", student, teacher, mask, temperature=2.0, crossing=crossing)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss("akl", student, teacher, mask, 2.0, crossing="tail").item() != pytest.approx(
        kd_loss("akl", student, teacher, mask, 2.0).item(), rel=1e-4
    )


def test_akl_guard_when_the_gap_is_zero():
    logits = random_logits(16, 3, V)
    value = divergence("akl", logits, logits.clone(), mu=0.5)
    assert torch.equal(value, torch.zeros(3))


def test_dpkd_is_log_two_without_gradient_where_the_top_tokens_agree():
    """h = 0 when the student's top token is the teacher's: -log sigmoid(0) = log 2 for any beta, and the
    choice does not move the student there (nothing to prefer); elsewhere the student is pushed to raise the
    teacher's top token against its own."""
    teacher = random_logits(20, 8, V)
    student = random_logits(21, 8, V)
    student[:4] = teacher[:4] + 0.3 * random_logits(22, 4, V)  # near the teacher ...
    student[:4, teacher[:4].argmax(-1)] += 50.0  # ... with the same top token
    student[4:, teacher[4:].argmax(-1)] -= 50.0  # ... a different one
    student.requires_grad_(True)
    for beta, smoothing in ((0.1, 0.0), (2.0, 0.2)):
        value = divergence("dpkd", student, teacher, beta=beta, label_smoothing=smoothing)
        torch.testing.assert_close(value[:4], torch.full((4,), math.log(2.0)))
        (grad,) = torch.autograd.grad(value.sum(), student)
        assert grad[:4].abs().max() == 0 and grad[4:].abs().max() > 1e-3
        chosen = teacher[4:].argmax(-1)
        assert (grad[4:].gather(1, chosen[:, None]) < 0).all()  # descent raises the teacher's top token


@pytest.mark.parametrize("objective", [o for o in OBJECTIVES if o not in NOT_DIVERGENCES])
def test_zero_probability_tokens_give_no_nan(objective):
    student, teacher = random_logits(17, 4, V), random_logits(18, 4, V)
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
        kl64(torch.softmax(teacher.double(), -1), torch.full((4, V), 1.0 / V, dtype=torch.float64)),
        rtol=1e-5,
        atol=1e-6,
    )


# -- options ------------------------------------------------------------------------------------------------
def test_validate_options_fills_defaults():
    assert validate_options("fkl") == {}
    assert validate_options("js") == {"beta": 0.5, "normalized": False}
    assert validate_options("js", beta=0, normalized=True) == {"beta": 0.0, "normalized": True}
    assert validate_options("skl") == {"alpha": 0.1} == validate_options("srkl")
    assert validate_options("srkl", alpha=0) == {"alpha": 0.0}
    assert validate_options("akl", mu=0.9) == {"mu": 0.9, "crossing": "head"}
    assert validate_options("akl", crossing="tail") == {"mu": 0.5, "crossing": "tail"}
    with pytest.raises(
        ValueError, match=r"akl option 'crossing' must be one of \['head', 'tail'\], got 'middle'"
    ):
        validate_options("akl", crossing="middle")


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
