"""core/kd/fused.py: the fused distill loss's value, metrics and gradients against a float64 reference and
against distillation_loss on full logits, for every objective, with prompt and padding masks, vocabulary
trimming, kd_rate 0 and 1, no response position, biases, chunk sizes, retain_graph, and its memory; the
last hidden state and the LM head it reads from a model."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.core.kd.reference import assert_close_to_max
from tests.helpers import MIXED_CORPUS, PROJECT_ROOT, SMALL, bpe_tokenizer, tiny_checkpoint
from warmup_distill_kedro.core.kd.divergences import LOG_FLOOR, OBJECTIVES, per_position
from warmup_distill_kedro.core.kd.fused import fused_distillation_loss, last_hidden_state, lm_head
from warmup_distill_kedro.core.kd.losses import KDConfig, distillation_loss
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX

sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
from peak_memory import peak_memory  # noqa: E402

torch.set_num_threads(1)


B, T, H_S, H_T = 2, 9, 8, 12


V_S, V_T, VOCAB = 44, 48, 40  # both heads padded past the tokenizer's 40 ids; the teacher more


def _labels() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, VOCAB, (B, T), generator=generator)
    labels[0, :3] = IGNORE_INDEX  # prompt
    labels[1, :2] = IGNORE_INDEX  # prompt
    labels[1, -3:] = IGNORE_INDEX  # padding
    return labels


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float64, bias: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)

    tensors = {
        "student_hidden": randn(B, T, H_S).requires_grad_(True),
        "student_head_weight": randn(V_S, H_S, scale=0.7).requires_grad_(True),
        "teacher_hidden": randn(B, T, H_T),
        "teacher_head_weight": randn(V_T, H_T, scale=0.7),
    }
    if bias:
        tensors["student_head_bias"] = randn(V_S, scale=0.3).requires_grad_(True)
        tensors["teacher_head_bias"] = randn(V_T, scale=0.3)
    return tensors


def _reference(inputs: dict[str, torch.Tensor], labels: torch.Tensor, config: KDConfig, vocab: int):
    """The loss in float64 from full logits: CE over the student's head, KD over the first `vocab` columns."""
    student_logits = inputs["student_hidden"] @ inputs["student_head_weight"].T
    teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_head_weight"].T
    if "student_head_bias" in inputs:
        student_logits = student_logits + inputs["student_head_bias"]
        teacher_logits = teacher_logits + inputs["teacher_head_bias"]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logits = student_logits[:, :-1][mask]
    n = max(int(mask.sum()), 1)
    ce = -torch.log_softmax(logits, dim=-1).gather(-1, targets[mask].unsqueeze(-1)).sum() / n

    def log_probs(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x[:, :vocab] / config.temperature, dim=-1).clamp(min=LOG_FLOOR)

    teacher_rows = teacher_logits[:, :-1][mask].detach()
    kd = per_position(config.objective, log_probs(logits), log_probs(teacher_rows), config.options).sum() / n
    return (1 - config.kd_rate) * ce + config.kd_rate * kd, ce, kd


def _grads(loss: torch.Tensor, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    wrt = {k: v for k, v in inputs.items() if v.requires_grad}
    return dict(zip(wrt, torch.autograd.grad(loss, list(wrt.values())), strict=True))


def _fused(inputs, labels, config, **kwargs):
    return fused_distillation_loss(**inputs, labels=labels, config=config, vocab_size=VOCAB, **kwargs)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("kd_rate", [0.0, 0.3, 1.0])
def test_matches_the_float64_reference(objective, kd_rate):
    inputs, labels = _inputs(), _labels()
    config = KDConfig(objective=objective, temperature=2.0, kd_rate=kd_rate, chunk_size=4)
    loss, metrics = _fused(inputs, labels, config)
    expected, ce, kd = _reference(inputs, labels, config, VOCAB)
    assert loss.dtype == torch.float32
    assert_close_to_max(loss, expected)
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert metrics["kd"] == pytest.approx(kd.item(), rel=1e-5, abs=1e-7)
    assert metrics["tokens"] == (labels[:, 1:] != IGNORE_INDEX).sum().item()
    fused_grads, expected_grads = _grads(loss, inputs), _grads(expected, inputs)
    assert set(fused_grads) == {"student_hidden", "student_head_weight"}
    for name, grad in fused_grads.items():
        assert grad.dtype == inputs[name].dtype
        assert_close_to_max(grad, expected_grads[name], rtol=1e-4)


@pytest.mark.parametrize("objective", ["fkl", "js", "akl"])
def test_matches_distillation_loss_on_full_logits(objective):
    """The float32 path users take without fusing: same value, metrics and gradients."""
    inputs, labels = _inputs(seed=1, dtype=torch.float32), _labels()
    config = KDConfig(objective=objective, temperature=1.5, kd_rate=0.5, chunk_size=3)
    loss, metrics = _fused(inputs, labels, config)
    student_logits = inputs["student_hidden"] @ inputs["student_head_weight"].T
    teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_head_weight"].T
    expected, expected_metrics = distillation_loss(student_logits, teacher_logits, labels, config, VOCAB)
    assert abs(loss.item() - expected.item()) < 1e-5 * abs(expected.item())
    assert metrics == pytest.approx(expected_metrics, rel=1e-5)
    expected_grads = _grads(expected, inputs)
    for name, grad in _grads(loss, inputs).items():
        assert_close_to_max(grad, expected_grads[name], rtol=1e-4)


def test_biases_get_their_gradient_and_the_teachers_none():
    inputs, labels = _inputs(seed=2, bias=True), _labels()
    inputs["teacher_hidden"].requires_grad_(True)  # detached inside: it must not get a gradient
    config = KDConfig(objective="srkl", kd_rate=0.5, chunk_size=5)
    loss, _ = _fused(inputs, labels, config)
    loss.backward()
    assert inputs["teacher_hidden"].grad is None
    inputs["teacher_hidden"].requires_grad_(False)
    expected, _, _ = _reference(inputs, labels, config, VOCAB)
    assert_close_to_max(loss, expected)
    expected_grads = _grads(expected, inputs)
    assert set(expected_grads) == {"student_hidden", "student_head_weight", "student_head_bias"}
    for name, grad in expected_grads.items():
        assert_close_to_max(inputs[name].grad, grad, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 1000])
def test_chunk_size_changes_nothing(chunk_size):
    inputs, labels = _inputs(seed=4), _labels()
    config = KDConfig(objective="tvd", kd_rate=0.5)
    loss, metrics = _fused(inputs, labels, config, chunk_size=chunk_size)
    reference, reference_metrics = _fused(inputs, labels, config, chunk_size=3)
    assert metrics == pytest.approx(reference_metrics, rel=1e-6)
    reference_grads = _grads(reference, inputs)
    for name, grad in _grads(loss, inputs).items():
        assert_close_to_max(grad, reference_grads[name], rtol=1e-5)


def test_no_response_position_gives_zero_and_zero_gradients():
    inputs = _inputs(seed=5)
    labels = torch.full((B, T), IGNORE_INDEX)
    labels[:, 0] = 3  # a first token predicts nothing: no position counts
    loss, metrics = _fused(inputs, labels, KDConfig(objective="akl", chunk_size=4))
    assert loss.item() == 0.0
    assert metrics == {"loss": 0.0, "ce": 0.0, "kd": 0.0, "tokens": 0.0}
    loss.backward()
    assert inputs["student_hidden"].grad.abs().sum() == 0
    assert inputs["student_head_weight"].grad.abs().sum() == 0


def test_same_vocabulary_needs_no_vocab_size_and_different_ones_are_refused():
    inputs, labels = _inputs(seed=6), _labels()
    same = {**inputs, "teacher_head_weight": inputs["teacher_head_weight"][:V_S]}
    config = KDConfig(objective="fkl", chunk_size=4)
    loss, _ = fused_distillation_loss(**same, labels=labels, config=config)
    expected, _, _ = _reference(same, labels, config, V_S)
    assert_close_to_max(loss, expected)
    with pytest.raises(ValueError, match="pass vocab_size"):
        fused_distillation_loss(**inputs, labels=labels, config=config)


def test_backward_scales_and_can_run_twice_with_retain_graph_only():
    inputs, labels = _inputs(seed=7), _labels()
    loss, _ = _fused(inputs, labels, KDConfig(objective="js", chunk_size=4))
    wrt = [inputs["student_hidden"], inputs["student_head_weight"]]
    once = torch.autograd.grad(loss, wrt, retain_graph=True)
    (3.0 * loss).backward(retain_graph=True)
    (3.0 * loss).backward()
    for tensor, grad in zip(wrt, once, strict=True):
        assert_close_to_max(tensor.grad, 6.0 * grad)
    with pytest.raises(RuntimeError, match="backward through a chunked loss a second time"):
        loss.backward()


def test_no_grad_gives_the_value_without_a_graph():
    inputs, labels = _inputs(seed=9), _labels()
    config = KDConfig(objective="rkl", chunk_size=4)
    with torch.no_grad():
        loss, metrics = _fused(inputs, labels, config)
    assert not loss.requires_grad
    expected, _, _ = _reference(inputs, labels, config, VOCAB)
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"chunk_size": None}, "needs a chunk size"),
        ({"chunk_size": 0}, "positive integer"),
        ({"student_head_weight": torch.zeros(V_S, H_S + 1)}, r"student head weight must be \[vocab, 8\]"),
        ({"teacher_hidden": torch.zeros(B, T + 1, H_T)}, "must share"),
        ({"student_head_bias": torch.zeros(V_S + 1)}, "student head bias"),
    ],
)
def test_wrong_arguments_are_refused(change, says):
    inputs = {**_inputs(seed=10), **change}
    chunk_size = inputs.pop("chunk_size", 4)
    with pytest.raises(ValueError, match=says):
        fused_distillation_loss(
            **inputs, labels=_labels(), config=KDConfig(), vocab_size=VOCAB, chunk_size=chunk_size
        )


def test_peak_memory_is_a_fraction_of_full_logits():
    """Small but logit-dominated: 512 positions, 4,000 tokens, hidden 32/48 (the benchmark does Qwen sizes)."""
    n, vocab, chunk = 512, 4000, 32
    generator = torch.Generator().manual_seed(11)
    student_hidden = torch.randn(1, n, 32, generator=generator, requires_grad=True)
    student_weight = (0.1 * torch.randn(vocab, 32, generator=generator)).requires_grad_(True)
    teacher_hidden = torch.randn(1, n, 48, generator=generator)
    teacher_weight = 0.1 * torch.randn(vocab, 48, generator=generator)
    labels = torch.randint(0, vocab, (1, n), generator=generator)
    config = KDConfig(objective="fkl", chunk_size=chunk)

    def naive():
        student_logits = student_hidden @ student_weight.T
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.T
        loss, _ = distillation_loss(
            student_logits, teacher_logits, labels, config.model_copy(update={"chunk_size": None})
        )
        loss.backward()
        return loss.item()

    def fused():
        loss, _ = fused_distillation_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, config
        )
        loss.backward()
        return loss.item()

    full = peak_memory(naive)
    student_hidden.grad = student_weight.grad = None
    chunked = peak_memory(fused)
    assert chunked.result == pytest.approx(full.result, rel=1e-5)
    assert chunked.peak_bytes < full.peak_bytes / 4
    assert chunked.retained_bytes == full.retained_bytes  # the gradients, adopted without a copy


# -- the model's last hidden state and head --------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints():
    """Two tiny models (only their forward passes and configs are read here)."""
    tokenizer = bpe_tokenizer(MIXED_CORPUS)
    return tiny_checkpoint(tokenizer, SMALL, seed=1), tiny_checkpoint(tokenizer, SMALL, seed=2)


def test_last_hidden_state_is_what_the_head_reads(checkpoints):
    teacher, _ = checkpoints
    input_ids = torch.tensor([[5, 9, 11, 3], [7, 7, 2, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        logits = teacher.model(input_ids=input_ids, attention_mask=attention_mask).logits
        hidden = last_hidden_state(teacher.model, input_ids, attention_mask)
    torch.testing.assert_close(lm_head(teacher.model)(hidden), logits)


def test_a_head_with_logit_post_processing_is_refused(checkpoints):
    _, student = checkpoints
    model = student.model
    model.config.final_logit_softcapping = 30.0
    try:
        with pytest.raises(ValueError, match=r"final_logit_softcapping.*fused_head: false"):
            lm_head(model)
    finally:
        del model.config.final_logit_softcapping
