"""core/kd/sinkhorn.py and core/kd/sinkd.py: the Sinkhorn distance against a float64 transcription of its
definition (value and gradient through the unrolled iterations) and of the official code, its blocks, its
identities (a distance between sets of positions: the order of either side does not matter), and SinKD's
loss beside its base divergence."""

from __future__ import annotations

import pytest
import torch

from tests.core.kd.reference import TEMPERATURE, assert_close_to_max, random_labels, random_logits
from warmup_distill_kedro.core.kd.config import KDSettings
from warmup_distill_kedro.core.kd.losses import KDConfig, distillation_loss, kd_loss
from warmup_distill_kedro.core.kd.sinkd import SinKDConfig, sinkd_loss
from warmup_distill_kedro.core.kd.sinkhorn import validate_sinkhorn_options

torch.set_num_threads(1)
N, V = 7, 13


def sinkhorn64(student: torch.Tensor, teacher: torch.Tensor, temperature, epsilon, iters) -> torch.Tensor:
    """The definition, in float64 and in the probability domain: K = exp(-D / epsilon), rows then columns
    scaled to 1/N, `iters` times; the loss sum(plan * D)."""
    s = torch.softmax(student.double() / temperature, dim=-1)
    p = torch.softmax(teacher.double() / temperature, dim=-1)
    cost = (s[:, None, :] - p[None, :, :]).abs().sum(-1)
    n = cost.shape[0]
    plan = torch.exp(-cost / epsilon)
    for _ in range(iters):
        plan = plan / plan.sum(dim=1, keepdim=True) / n
        plan = plan / plan.sum(dim=0, keepdim=True) / n
    return (plan * cost).sum()


def official_sinkhorn(student: torch.Tensor, teacher: torch.Tensor, temperature) -> torch.Tensor:
    """2018cx/SinKD loss.py `Sinkhorn.sinkhorn_loss` (marginals 1, epsilon 0.1, 20 iterations) without its
    0.001 factor, on float64 rows."""
    x = torch.softmax(student.double() / temperature, dim=1)
    y = torch.softmax(teacher.double() / temperature, dim=1)
    w = torch.cdist(x, y, p=1)
    k = torch.exp(-w / 0.1)
    for _ in range(20):
        k = k / torch.sum(k, dim=1, keepdim=True)
        k = k / torch.sum(k, dim=0, keepdim=True)
    return torch.sum(k * w)


def _sinkhorn(student, teacher, mask=None, **options):
    mask = torch.ones(student.shape[:-1], dtype=torch.bool) if mask is None else mask
    return kd_loss("sinkhorn", student, teacher, mask, TEMPERATURE, **options)


@pytest.mark.parametrize(("epsilon", "iters"), [(0.1, 20), (0.5, 3), (0.05, 50)])
def test_value_and_gradient_match_the_float64_definition(epsilon, iters):
    student, teacher = random_logits(0, N, V), random_logits(1, N, V)
    ours = student.clone().requires_grad_(True)
    value = _sinkhorn(ours, teacher, epsilon=epsilon, iters=iters)
    value.backward()
    reference = student.double().requires_grad_(True)
    expected = sinkhorn64(reference, teacher, TEMPERATURE, epsilon, iters)
    expected.backward()
    assert value.dtype == torch.float32 and expected > 0.1
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=0)
    assert ours.grad.abs().max() > 1e-3
    assert_close_to_max(ours.grad, reference.grad, rtol=1e-4)


def test_the_official_code_is_n_times_this_distance():
    """Its marginals are 1 (the columns of its plan sum to 1, the whole plan to N), this code's 1/N."""
    student, teacher = random_logits(2, N, V), random_logits(3, N, V)
    torch.testing.assert_close(
        _sinkhorn(student, teacher).double() * N,
        official_sinkhorn(student, teacher, TEMPERATURE),
        rtol=1e-5,
        atol=0,
    )


def test_only_the_masked_positions_count_and_the_teacher_gets_no_gradient():
    student, teacher = random_logits(4, 2, 5, V), random_logits(5, 2, 5, V).requires_grad_(True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1:4], mask[1, 0:5:2] = True, True
    moved = student.clone()
    moved[~mask] = random_logits(6, int((~mask).sum()), V)  # prompt and padding positions: anything
    ours = student.clone().requires_grad_(True)
    value = _sinkhorn(ours, teacher, mask)
    value.backward()
    assert value.item() == _sinkhorn(moved, teacher, mask).item()
    torch.testing.assert_close(value, _sinkhorn(student[mask], teacher[mask].detach()))
    assert ours.grad[~mask].abs().max() == 0 and ours.grad[mask].abs().max() > 1e-3
    assert teacher.grad is None
    empty = _sinkhorn(ours, teacher, torch.zeros(2, 5, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad


def test_it_compares_sets_of_positions_whatever_their_order():
    """Sinkhorn scales whole rows and columns: permuting the student's positions (or the teacher's) permutes
    the plan and leaves the distance as it is; a position-wise divergence changes."""
    student, teacher = random_logits(7, N, V), random_logits(8, N, V)
    order = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    torch.testing.assert_close(
        _sinkhorn(student[order], teacher), _sinkhorn(student, teacher), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        _sinkhorn(student, teacher[order]), _sinkhorn(student, teacher), rtol=1e-6, atol=0
    )
    mask = torch.ones(N, dtype=torch.bool)
    fkl = (
        kd_loss("fkl", student, teacher, mask, TEMPERATURE),
        kd_loss("fkl", student[order], teacher, mask, TEMPERATURE),
    )
    assert abs(fkl[0] - fkl[1]) > 1e-2


def test_equal_sets_are_near_zero_and_closer_sets_are_closer():
    teacher = random_logits(9, N, V)
    same = _sinkhorn(teacher.clone(), teacher, epsilon=0.01, iters=200)
    near = _sinkhorn(teacher + 0.3 * random_logits(10, N, V, scale=1.0), teacher)
    far = _sinkhorn(random_logits(11, N, V), teacher)
    assert same < 1e-4 and 0 < near < far


def test_blocks_are_separate_problems_and_the_loss_is_their_mean():
    student, teacher = random_logits(12, 10, V), random_logits(13, 10, V)
    blocks = [_sinkhorn(student[a:b], teacher[a:b]) for a, b in ((0, 4), (4, 8), (8, 10))]
    torch.testing.assert_close(_sinkhorn(student, teacher, block=4), torch.stack(blocks).mean())
    assert abs(_sinkhorn(student, teacher, block=4) - _sinkhorn(student, teacher)) > 1e-3


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"epsilon": 0}, "'epsilon' must be a finite number > 0"),
        ({"epsilon": float("inf")}, "'epsilon' must be a finite number > 0"),
        ({"iters": 0}, "'iters' must be an integer >= 1"),
        ({"block": 2.5}, "'block' must be an integer >= 1"),
        ({"blocks": 8}, "unknown option 'blocks'"),
    ],
)
def test_bad_options_are_named(options, says):
    with pytest.raises(ValueError, match=says):
        validate_sinkhorn_options(**options)
    with pytest.raises(ValueError, match=says):
        _sinkhorn(random_logits(0, 3, V), random_logits(1, 3, V), **options)


# -- SinKD: the base divergence plus the Sinkhorn term ------------------------------------------------------
def _sinkd_config(**changes) -> SinKDConfig:
    settings = KDSettings(temperature=TEMPERATURE, kd_rate=0.4, chunk_size=3)
    return SinKDConfig.from_options(
        settings, {"weight": 0.7, "base": "js", "base_options": {"beta": 0.3}, **changes}
    )


@pytest.mark.parametrize("ce", [True, False])
def test_sinkd_adds_the_weighted_sinkhorn_term_to_its_base_loss(ce):
    labels = random_labels()
    student, teacher = random_logits(14, *labels.shape, V), random_logits(15, *labels.shape, V)
    config = _sinkd_config()
    ours = student.clone().requires_grad_(True)
    loss, metrics = sinkd_loss(ours, teacher, labels, config, ce=ce)
    loss.backward()

    base = KDConfig(temperature=TEMPERATURE, kd_rate=0.4, chunk_size=3, objective="js", options={"beta": 0.3})
    alone = student.clone().requires_grad_(True)
    base_loss, base_metrics = distillation_loss(alone, teacher, labels, base, ce=ce)
    mask = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100) != -100  # position t predicts t + 1
    sinkhorn = _sinkhorn(alone, teacher, mask)
    (base_loss + 0.4 * 0.7 * sinkhorn).backward()

    assert metrics["sinkhorn"] == pytest.approx(sinkhorn.item(), rel=1e-6) and metrics["sinkhorn"] > 0.05
    assert metrics["kd"] == pytest.approx(base_metrics["kd"], rel=1e-6)
    assert loss.item() == pytest.approx((base_loss + 0.28 * sinkhorn).item(), rel=1e-6)
    assert metrics["loss"] == pytest.approx(loss.item())
    torch.testing.assert_close(ours.grad, alone.grad)
    if not ce:
        assert loss.item() == pytest.approx(0.4 * (metrics["kd"] + 0.7 * metrics["sinkhorn"]), rel=1e-6)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"base": "kl"}, "base\n.*unknown KD objective 'kl'"),
        ({"base_options": {"beta": 2.0}}, "js option 'beta'"),
        ({"epsilon": -1.0}, "'epsilon' must be a finite number > 0"),
        ({"weight": -0.1}, "weight"),
        ({"gamma": 1.0}, "gamma"),
    ],
)
def test_sinkd_options_are_checked(options, says):
    with pytest.raises(ValueError, match=says):
        _sinkd_config(**options)
