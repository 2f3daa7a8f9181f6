"""core/kd/losses.py: kd_loss (masking, temperature, dtypes, vocabulary trimming, input errors), the CE + KD
mix of distillation_loss, and KDConfig."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tests.core.kd.reference import TEMPERATURE, B, T, V, random_labels, random_logits, response_mask
from warmup_distill_kedro.core.kd.divergences import OBJECTIVES, divergence
from warmup_distill_kedro.core.kd.losses import KDConfig, distillation_loss, kd_loss
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX

torch.set_num_threads(1)


# -- kd_loss: masking, temperature, dtypes, vocabulary ------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_masked_out_positions_do_not_count(objective, chunk_size):
    student, teacher, mask = random_logits(19, B, T, V), random_logits(20, B, T, V), response_mask()
    clean = student.clone().requires_grad_(True)
    value = kd_loss(objective, clean, teacher, mask, TEMPERATURE, chunk_size)
    value.backward()
    expected = divergence(objective, student[mask], teacher[mask], TEMPERATURE).mean()
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)

    noisy_student, noisy_teacher = student.clone(), teacher.clone()
    noisy_student[~mask] = random_logits(21, int((~mask).sum()), V, scale=1e4)
    noisy_teacher[~mask] = random_logits(22, int((~mask).sum()), V, scale=1e4)
    noisy_student.requires_grad_(True)
    noisy = kd_loss(objective, noisy_student, noisy_teacher, mask, TEMPERATURE, chunk_size)
    noisy.backward()
    assert torch.equal(noisy, value)
    assert (noisy_student.grad[~mask] == 0).all()
    assert torch.equal(noisy_student.grad, clean.grad)
    assert clean.grad[mask].abs().max() > 1e-4


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_all_masked_is_zero_with_a_graph(chunk_size):
    student = random_logits(23, B, T, V).requires_grad_(True)
    value = kd_loss(
        "js", student, random_logits(24, B, T, V), torch.zeros(B, T, dtype=torch.bool), 2.0, chunk_size
    )
    assert value.item() == 0.0 and value.dtype == torch.float32 and value.requires_grad
    value.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_kd_temperature_is_a_logit_scale(chunk_size):
    student, teacher, mask = random_logits(25, B, T, V), random_logits(26, B, T, V), response_mask()
    at_t = kd_loss("srkl", student, teacher, mask, TEMPERATURE, chunk_size)
    scaled = kd_loss("srkl", student / TEMPERATURE, teacher / TEMPERATURE, mask, 1.0, chunk_size)
    torch.testing.assert_close(at_t, scaled)
    assert abs(at_t.item() - kd_loss("srkl", student, teacher, mask, 1.0, chunk_size).item()) > 1e-3


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("objective", ["fkl", "js", "akl"])
def test_bf16_inputs_are_computed_in_float32(objective, chunk_size):
    student16 = random_logits(27, B, T, V).bfloat16().requires_grad_(True)
    teacher16 = random_logits(28, B, T, V).bfloat16()
    student32 = student16.detach().float().requires_grad_(True)
    mask = response_mask()
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
    student, teacher, mask = random_logits(29, B, T, V), random_logits(30, B, T, V), response_mask()
    reference = kd_loss("fkl", student, teacher, mask, 2.0, chunk_size)
    padded_student = torch.cat([student, random_logits(31, B, T, 2, scale=50.0)], dim=-1).requires_grad_(True)
    padded_teacher = torch.cat([teacher, random_logits(32, B, T, 4, scale=50.0)], dim=-1)
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
    student = random_logits(33, B, T, V).requires_grad_(True)
    teacher = random_logits(34, B, T, V).requires_grad_(True)
    for chunk_size in (None, 3):
        kd_loss("js", student, teacher, response_mask(), 2.0, chunk_size).backward()
    assert teacher.grad is None and student.grad is not None


def test_kd_loss_input_errors():
    student, teacher, mask = random_logits(35, B, T, V), random_logits(36, B, T, V), response_mask()
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


# -- distillation_loss --------------------------------------------------------------------------------------
def _ce64(student: torch.Tensor, labels: torch.Tensor) -> float:
    targets = labels[:, 1:].flatten()
    logits = student[:, :-1].flatten(0, 1).double()
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX).item()


def test_distillation_loss_mixes_ce_and_kd():
    labels = random_labels()
    student, teacher = random_logits(42, B, T + 1, V), random_logits(43, B, T + 1, V)
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
    labels = random_labels()
    student, teacher = random_logits(44, B, T + 1, V), random_logits(45, B, T + 1, V + 5)
    config = KDConfig(objective="fkl", kd_rate=1.0)
    with pytest.raises(ValueError, match="vocab_size"):
        distillation_loss(student, teacher, labels, config)
    trimmed, _ = distillation_loss(student, teacher, labels, config, vocab_size=V)
    expected, _ = distillation_loss(student, teacher[..., :V], labels, config)
    assert trimmed.item() == pytest.approx(expected.item(), rel=1e-6)


# -- config -------------------------------------------------------------------------------------------------
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
