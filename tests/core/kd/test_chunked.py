"""core/kd/chunked.py: kd_loss and distillation_loss chunk by chunk, through autograd or the closed forms
(value, CE and the student's gradient in one pass), against the unchunked path and float64 formulas; and
the gradient buffer the chunked backward hands over."""

from __future__ import annotations

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
    assert_close_to_max,
    random_labels,
    random_logits,
    reference_divergence,
    response_mask,
)
from warmup_distill_kedro.core.kd.divergences import divergence
from warmup_distill_kedro.core.kd.losses import KDConfig, distillation_loss, kd_loss
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX

torch.set_num_threads(1)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("chunk_size", [1, 3, 64, None])
@pytest.mark.parametrize(("objective", "options"), CASES, ids=CASE_IDS)
def test_chunked_equals_unchunked(objective, options, chunk_size):
    """kd_loss (closed form or autograd chunk by chunk) against autograd through the whole masked rows."""
    student, teacher, mask = random_logits(37, B, T, V), random_logits(38, B, T, V), response_mask()
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
    student, teacher, mask = (
        random_logits(39, B, T, V).requires_grad_(True),
        random_logits(40, B, T, V),
        response_mask(),
    )
    with torch.no_grad():
        value = kd_loss("akl", student, teacher, mask, 2.0, 2)
    assert not value.requires_grad
    torch.testing.assert_close(value, kd_loss("akl", student, teacher, mask, 2.0).detach())


def test_chunked_kd_loss_backward_scales_and_can_run_twice_with_retain_graph_only():
    """kd_loss's chunked path hands its buffer over in a plain backward and copies it with retain_graph."""
    generator = torch.Generator().manual_seed(8)
    student = torch.randn(3, 5, 11, generator=generator, requires_grad=True)
    teacher = torch.randn(3, 5, 11, generator=generator)
    mask = torch.rand(3, 5, generator=generator) > 0.3
    (expected,) = torch.autograd.grad(kd_loss("skl", student, teacher, mask), student)
    loss = kd_loss("skl", student, teacher, mask, chunk_size=2)
    (2.0 * loss).backward(retain_graph=True)
    (2.0 * loss).backward()
    assert_close_to_max(student.grad, 4.0 * expected)
    with pytest.raises(RuntimeError, match="backward through a chunked loss a second time"):
        loss.backward()


# -- the closed forms (value, CE and the student's gradient in one chunked pass) -----------------------------
def _mix64(student, teacher, labels, objective, options, temperature, kd_rate, vocab):
    """(1 - kd_rate) CE over the student's full width + kd_rate KD over the first `vocab` columns, float64."""
    student = student.double()
    targets = labels[:, 1:]
    response = targets != IGNORE_INDEX
    shifted = student[:, :-1][response]
    ce = torch.nn.functional.cross_entropy(shifted, targets[response], reduction="mean")
    teacher_rows = teacher[:, :-1][response][:, :vocab]
    kd = reference_divergence(objective, shifted[:, :vocab], teacher_rows, temperature, **options).mean()
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
    labels = random_labels()
    student = random_logits(60, B, T + 1, V + extra_columns)
    teacher = random_logits(61, B, T + 1, V)
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


SMALL_DIVERGENCE_CASES = [case for case in CLOSED_FORM_CASES if case[0] not in NOT_DIVERGENCES]  # dpkd: log 2


@pytest.mark.parametrize(
    ("objective", "options"),
    SMALL_DIVERGENCE_CASES,
    ids=[i for i, c in zip(CLOSED_FORM_IDS, CLOSED_FORM_CASES, strict=True) if c in SMALL_DIVERGENCE_CASES],
)
@pytest.mark.parametrize(("spread", "grad_rtol"), [(1e-2, 1e-4), (1e-3, 1e-3)])
def test_closed_form_keeps_small_divergences(objective, options, spread, grad_rtol):
    """Student and teacher close together: the divergences are O(spread^2) (tvd O(spread)), far below
    float32's resolution of O(1) log-probabilities, so a value can only be right to about 1e-7 absolute
    (autograd through the formulas does no better); the gradient, O(spread), must keep its relative
    precision: the mixtures' log-ratios come through log1p / expm1, and the constant part of q / m drops
    out before the centring (without that, srkl at alpha 0.9 lost two digits)."""
    teacher = random_logits(64, B, T, V)
    student = teacher + spread * random_logits(65, B, T, V, scale=1.0)
    mask = torch.ones(B, T, dtype=torch.bool)
    closed = student.clone().requires_grad_(True)
    value = kd_loss(objective, closed, teacher, mask, TEMPERATURE, **options)
    value.backward()
    expected_student = student.double().requires_grad_(True)
    rows = (expected_student.flatten(0, 1), teacher.double().flatten(0, 1))
    expected = reference_divergence(objective, *rows, TEMPERATURE, **options).mean()
    expected.backward()
    assert 0 < expected.item() < 100 * spread
    assert value.item() == pytest.approx(expected.item(), abs=1e-7)
    assert _rel_diff(closed.grad.double(), expected_student.grad) < grad_rtol


@pytest.mark.parametrize(("objective", "options"), CASES, ids=CASE_IDS)
def test_closed_form_falls_back_to_autograd_for_minus_infinity_logits(objective, options):
    """A student logit of -inf (a masked token) reaches the log floor, where the closed form's gradient
    would differ from the clamp's: that chunk goes through autograd and still matches the masked formula."""
    student, teacher, mask = random_logits(62, B, T, V), random_logits(63, B, T, V), response_mask()
    student[..., 0] = float("-inf")
    teacher[..., 0] = -1e4  # the teacher agrees the token is impossible, so KL stays finite
    closed = student.clone().requires_grad_(True)
    kd_loss(objective, closed, teacher, mask, 1.0, **options).backward()
    assert torch.isfinite(closed.grad).all() and (closed.grad[..., 0] == 0).all()
    finite = student[..., 1:].clone().requires_grad_(True)
    kd_loss(objective, finite, teacher[..., 1:], mask, 1.0, **options).backward()
    torch.testing.assert_close(closed.grad[..., 1:], finite.grad, rtol=1e-4, atol=1e-6)
