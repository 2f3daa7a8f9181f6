"""core/kd/minillm.py and core/generation/mixed.py: MiniLLM's estimator against the exact gradient of the
sequence-level reverse KL (a vocabulary of 3, sequences of 2, every sequence enumerated), its advantages
against a plain-Python transcription, PPO's clip, the rollouts (rounds, importance weights, rewards,
resume), and sampling from the teacher-mixed distribution."""

from __future__ import annotations

import copy
import itertools
import math

import pandas as pd
import pytest
import torch

from tests.helpers import TINY, bpe_tokenizer, tiny_checkpoint, tiny_splits
from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.generation.mixed import TeacherMix
from warmup_distill_kedro.core.generation.sampling import generate_from_ids
from warmup_distill_kedro.core.kd.config import KDSettings
from warmup_distill_kedro.core.kd.minillm import (
    OLD_LOGPROBS,
    REWARDS,
    WEIGHTS,
    MiniLLMConfig,
    MiniLLMRollouts,
    advantages,
    minillm_loss,
)
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX, encode_examples
from warmup_distill_kedro.core.tasks import training_texts

torch.set_num_threads(1)
V = 3  # tokens 0, 1, 2; the prompt is token 0, the response two tokens


def _config(**options) -> MiniLLMConfig:
    return MiniLLMConfig.from_options(KDSettings(), options)


# The estimator's exact expectation: each sequence's gradient weighted by its probability.
UNBIASED = {"gamma": 1.0, "length_norm": False, "whiten": False, "reward_scaling": 1.0, "alpha": 0.0}


def _tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A policy over 2-token sequences: logits of the first token [V], of the second given the first [V, V]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=generator, dtype=torch.float64) * 1.5, torch.randn(
        V, V, generator=generator, dtype=torch.float64
    ) * 1.5


def _sequence_logprob(first: torch.Tensor, second: torch.Tensor, y: tuple[int, int]) -> torch.Tensor:
    return first.log_softmax(-1)[y[0]] + second[y[0]].log_softmax(-1)[y[1]]


def _exact_gradient(first, second, teacher) -> tuple[torch.Tensor, torch.Tensor]:
    """d/d(theta) KL(q || p) over whole sequences, by enumeration, in float64."""
    first, second = first.clone().requires_grad_(True), second.clone().requires_grad_(True)
    kl = sum(
        _sequence_logprob(first, second, y).exp()
        * (_sequence_logprob(first, second, y) - _sequence_logprob(*teacher, y))
        for y in itertools.product(range(V), repeat=2)
    )
    return torch.autograd.grad(kl, (first, second))


def _row(first, second, teacher, y) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One rollout y of the tabular policy as minillm_loss reads it: logits [1, 3, V] (position 0 predicts
    y[0] from the prompt, position 1 predicts y[1]), and its batch."""
    student = torch.stack([first, second[y[0]], torch.zeros(V, dtype=first.dtype)]).unsqueeze(0).float()
    teacher_logits = torch.stack([teacher[0], teacher[1][y[0]], torch.zeros(V, dtype=first.dtype)]).unsqueeze(
        0
    )
    with torch.no_grad():
        log_q = [first.log_softmax(-1)[y[0]], second[y[0]].log_softmax(-1)[y[1]]]
        log_p = [teacher[0].log_softmax(-1)[y[0]], teacher[1][y[0]].log_softmax(-1)[y[1]]]
    batch = {
        "input_ids": torch.tensor([[0, *y]]),
        "labels": torch.tensor([[IGNORE_INDEX, *y]]),
        OLD_LOGPROBS: torch.tensor([[0.0, *map(float, log_q)]]),
        REWARDS: torch.tensor([[0.0, *(float(p - q) for p, q in zip(log_p, log_q, strict=True))]]),
        WEIGHTS: torch.tensor([[0.0, 1.0, 1.0]]),
    }
    return student, teacher_logits.float(), batch


def _estimator_gradient(first, second, teacher, config, y) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient minillm_loss gives on the single rollout y, times its 2 tokens (the loss is a token mean)."""
    first32 = first.float().requires_grad_(True)
    second32 = second.float().requires_grad_(True)
    student, teacher_logits, batch = _row(first32, second32, teacher, y)
    loss, _ = minillm_loss(student, teacher_logits, batch, config)
    return tuple(2.0 * g.double() for g in torch.autograd.grad(loss, (first32, second32), allow_unused=True))


def _expected_estimate(first, second, teacher, config) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        probabilities = {
            y: _sequence_logprob(first, second, y).exp() for y in itertools.product(range(V), repeat=2)
        }
    total = [torch.zeros_like(first), torch.zeros_like(second)]
    for y, probability in probabilities.items():
        for sum_, grad in zip(total, _estimator_gradient(first, second, teacher, config, y), strict=True):
            sum_ += probability * grad
    return total[0], total[1]


@pytest.mark.parametrize(
    ("form", "options"),
    [
        ("the paper's split: single-step + long-term from the next token", {"long_term_from": "next"}),
        (
            "the long-term term alone, from the current token",
            {"long_term_from": "current", "single_step": False},
        ),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_the_estimator_is_the_exact_gradient_of_the_sequence_level_reverse_kl(form, options, seed):
    """Averaged over every sequence the student can write (vocabulary 3, length 2), the policy-gradient
    estimate is the gradient of KL(q || p) over whole sequences, computed by enumeration in float64."""
    first, second = _tables(seed)
    teacher = _tables(seed + 10)
    exact = _exact_gradient(first, second, teacher)
    estimate = _expected_estimate(first, second, teacher, _config(**UNBIASED, **options))
    assert exact[0].abs().max() > 0.05 and exact[1].abs().max() > 0.05
    for got, want in zip(estimate, exact, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_codes_default_counts_the_single_step_term_twice():
    """The official code's advantage includes the current token's reward and it adds the single-step term
    on top: in expectation, the exact gradient plus the single-step term's own gradient once more."""
    first, second = _tables(2)
    teacher = _tables(12)
    exact = _exact_gradient(first, second, teacher)
    code = _expected_estimate(first, second, teacher, _config(**UNBIASED, long_term_from="current"))
    single_alone = _expected_estimate(first, second, teacher, _config(**UNBIASED, long_term_from="next"))
    long_alone = _expected_estimate(
        first, second, teacher, _config(**UNBIASED, long_term_from="next", single_step=False)
    )
    for c, e, s, lt in zip(code, exact, single_alone, long_alone, strict=True):
        torch.testing.assert_close(c, e + (s - lt), rtol=1e-4, atol=1e-6)
        assert (c - e).abs().max() > 1e-2


def test_a_sampled_average_converges_to_the_exact_gradient():
    """The estimate on 20,000 sampled sequences: within 4 standard errors of the exact gradient."""
    first, second = _tables(3)
    teacher = _tables(13)
    config = _config(**UNBIASED, long_term_from="next")
    exact = torch.cat([g.flatten() for g in _exact_gradient(first, second, teacher)])
    generator = torch.Generator().manual_seed(0)
    y1 = torch.multinomial(first.softmax(-1), 20_000, replacement=True, generator=generator)
    y2 = torch.stack(
        [torch.multinomial(second[t].softmax(-1), 1, generator=generator)[0] for t in y1.tolist()]
    )
    per_sequence = {
        y: torch.cat([g.flatten() for g in _estimator_gradient(first, second, teacher, config, y)])
        for y in itertools.product(range(V), repeat=2)
    }
    samples = torch.stack([per_sequence[(a, b)] for a, b in zip(y1.tolist(), y2.tolist(), strict=True)])
    error = samples.mean(0) - exact
    stderr = samples.std(0) / math.sqrt(len(samples))
    assert (error.abs() <= 4 * stderr + 1e-9).all(), (error, stderr)


# -- advantages and the PPO clip ------------------------------------------------------------------------------
def _advantages_by_hand(rewards, lengths, gamma, length_norm, from_next, whiten):
    rows = []
    for row, n in zip(rewards, lengths, strict=True):
        values = []
        for t in range(n):
            start = t + 1 if from_next else t
            value = sum(gamma ** (k - start) * row[k] for k in range(start, n))
            values.append(value / (n - t) if length_norm else value)
        rows.append(values)
    if whiten:
        flat = [v for row in rows for v in row]
        mean = sum(flat) / len(flat)
        std = math.sqrt(sum((v - mean) ** 2 for v in flat) / len(flat) + 1e-8)
        rows = [[(v - mean) / std for v in row] for row in rows]
    return rows


@pytest.mark.parametrize("from_next", [False, True])
@pytest.mark.parametrize(
    ("gamma", "length_norm", "whiten"), [(0.95, True, True), (1.0, False, False), (0.5, True, False)]
)
def test_advantages_match_a_plain_transcription(gamma, length_norm, whiten, from_next):
    generator = torch.Generator().manual_seed(4)
    rewards = torch.randn(3, 6, generator=generator)
    lengths = [6, 2, 4]
    mask = torch.tensor([[t < n for t in range(6)] for n in lengths])
    config = _config(
        gamma=gamma, length_norm=length_norm, whiten=whiten, long_term_from="next" if from_next else "current"
    )
    got = advantages(rewards * mask + 7.0 * ~mask, mask, config)  # values beyond a response do not leak in
    expected = _advantages_by_hand(rewards.tolist(), lengths, gamma, length_norm, from_next, whiten)
    for row, n, want in zip(got, lengths, expected, strict=True):
        assert row[:n].tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert (row[n:] == 0).all()


def test_the_ppo_clip_stops_the_gradient_beyond_the_clip_range():
    """A token whose ratio already left [1 - clip, 1 + clip] in the direction its advantage pushes gets no
    gradient from the long-term term; one inside still does."""
    config = _config(gamma=1.0, length_norm=False, whiten=False, single_step=False, cliprange=0.2)
    logits = torch.zeros(1, 3, V, requires_grad=True)
    batch = {
        "input_ids": torch.tensor([[0, 1, 2]]),
        "labels": torch.tensor([[IGNORE_INDEX, 1, 2]]),
        OLD_LOGPROBS: torch.tensor([[0.0, math.log(1 / 3) - 0.5, math.log(1 / 3)]]),  # ratio e^0.5 at token 1
        REWARDS: torch.tensor([[0.0, 0.0, 1.0]]),  # positive advantages at both tokens
        WEIGHTS: torch.tensor([[0.0, 1.0, 1.0]]),
    }
    loss, metrics = minillm_loss(logits, None, batch, config)
    loss.backward()
    assert logits.grad[0, 0].abs().max() == 0  # token 1: ratio 1.65 > 1.2 and A > 0, clipped
    assert logits.grad[0, 1].abs().max() > 0.1  # token 2: ratio 1, inside
    assert metrics["ratio"] == pytest.approx((math.exp(0.5) + 1) / 2, rel=1e-5)


# -- rollouts and mixed sampling -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    train, validation, _ = tiny_splits()
    tokenizer = bpe_tokenizer(training_texts(pd.concat([train, validation])))
    return (
        tokenizer,
        tiny_checkpoint(tokenizer, TINY, seed=1).model,
        tiny_checkpoint(tokenizer, TINY, seed=2).model,
        train,
    )


def test_with_alpha_one_the_mixed_sampler_is_the_teachers_own_sampler(models):
    tokenizer, teacher, student, train = models
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in train["prompt"].head(6)]
    sampling = SamplingConfig(do_sample=True, max_new_tokens=8, batch_size=3, seed=5, show_progress=False)
    mixed = generate_from_ids(student, tokenizer, prompts, sampling, teacher_mix=TeacherMix(teacher, 1.0))
    own = generate_from_ids(teacher, tokenizer, prompts, sampling)
    assert [g.token_ids for g in mixed] == [g.token_ids for g in own]
    student_own = generate_from_ids(student, tokenizer, prompts, sampling)
    assert [g.token_ids for g in mixed] != [g.token_ids for g in student_own]
    # ...and the log-probabilities returned are the student's own, of the tokens the mixture chose.
    sequence = prompts[0] + mixed[0].token_ids
    with torch.no_grad():
        logits = student(input_ids=torch.tensor([sequence])).logits[0, :, : len(tokenizer)].log_softmax(-1)
    start = len(prompts[0])
    expected = [logits[start - 1 + t, token].item() for t, token in enumerate(mixed[0].token_ids)]
    assert mixed[0].logprobs == pytest.approx(expected, abs=1e-5)


def test_the_mixed_sampler_draws_from_the_mixture(models):
    """First tokens of 600 samples of one prompt: their frequencies are alpha p + (1 - alpha) q (a chi-square
    test at about the 0.1% level, tokens pooled into bins of an expected count of 10 or more)."""
    tokenizer, teacher, student, train = models
    # A random tiny teacher is near uniform over the vocabulary: sharpen it (its final norm scales its logits)
    # so that the mixture differs from the student's own sampler.
    teacher = copy.deepcopy(teacher)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(12.0)
    prompt = tokenizer(train["prompt"].iloc[0], add_special_tokens=False)["input_ids"]
    alpha, n = 0.4, 600
    sampling = SamplingConfig(do_sample=True, max_new_tokens=1, batch_size=n, seed=1, show_progress=False)
    draws = generate_from_ids(
        student, tokenizer, [prompt] * n, sampling, teacher_mix=TeacherMix(teacher, alpha)
    )
    with torch.no_grad():
        p = teacher(input_ids=torch.tensor([prompt])).logits[0, -1, : len(tokenizer)].softmax(-1).double()
        q = student(input_ids=torch.tensor([prompt])).logits[0, -1, : len(tokenizer)].softmax(-1).double()
    mix = alpha * p + (1 - alpha) * q
    first = [g.token_ids[0] if g.token_ids else tokenizer.eos_token_id for g in draws]
    counts = torch.bincount(torch.tensor(first), minlength=len(tokenizer)).double()

    # Bins: tokens in order of the mixture's probability, cut whenever a bin expects 10 draws.
    bins, current, mass = [], [], 0.0
    for token in mix.argsort(descending=True).tolist():
        current.append(token)
        mass += n * mix[token].item()
        if mass >= 10:
            bins.append(current)
            current, mass = [], 0.0
    bins[-1].extend(current)

    def chi2(probabilities: torch.Tensor) -> float:
        return sum(
            (counts[b].sum() - n * probabilities[b].sum()) ** 2 / (n * probabilities[b].sum()) for b in bins
        ).item()

    dof = len(bins) - 1
    assert dof >= 10, dof
    assert chi2(mix) < dof + 4.5 * math.sqrt(2 * dof), (chi2(mix), dof)
    assert chi2(q) > dof + 4.5 * math.sqrt(2 * dof)  # ...a test that tells the student's own sampler apart


def test_rollouts_carry_the_rewards_and_weights_of_their_tokens_and_resume(models, tmp_path):
    tokenizer, teacher, student, train = models
    encoded, _ = encode_examples(tokenizer, train.head(6), 128)
    config = _config(num_rollouts=6, ppo_epochs=2, alpha=0.3, reward_scaling=0.5, cliprange_reward=0.4)
    sampling = SamplingConfig(do_sample=True, max_new_tokens=6, batch_size=6, show_progress=False)
    source = MiniLLMRollouts(
        encoded, student, teacher, tokenizer, config, sampling, batch_size=3, seed=0, max_length=128
    )
    assert source.per_round == 4  # 2 epochs of 2 batches of 3
    first = source.batch(0)
    rollouts = list(source.rollouts)
    for position in range(1, 4):
        source.batch(position)
    assert source.round_index == 0 and source.rollouts == rollouts  # the same round
    # Each token's values against independent forwards of both models.
    with torch.no_grad():
        ids, labels = first["input_ids"], first["labels"]
        mask = labels[:, 1:] != IGNORE_INDEX
        log_q = student(input_ids=ids, attention_mask=first["attention_mask"]).logits[
            :, :-1, : len(tokenizer)
        ]
        log_p = teacher(input_ids=ids, attention_mask=first["attention_mask"]).logits[
            :, :-1, : len(tokenizer)
        ]
        targets = labels[:, 1:].clamp(min=0).unsqueeze(-1)
        log_q = log_q.log_softmax(-1).gather(-1, targets).squeeze(-1)
        log_p = log_p.log_softmax(-1).gather(-1, targets).squeeze(-1)
    q, p = log_q.exp(), log_p.exp()
    torch.testing.assert_close(first[OLD_LOGPROBS][:, 1:][mask], log_q[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(
        first[WEIGHTS][:, 1:][mask], (q / (0.3 * p + 0.7 * q))[mask], atol=1e-4, rtol=1e-4
    )
    rewards = ((log_p - log_q) / 0.5).clamp(-0.4, 0.4)
    torch.testing.assert_close(first[REWARDS][:, 1:][mask], rewards[mask], atol=2e-4, rtol=0)
    assert (first[REWARDS][:, 1:][mask].abs() == 0.4).any()  # the clip did bite
    # A run resumed mid-round trains on the same rollouts; the next round is sampled anew.
    resumed = MiniLLMRollouts(
        encoded, student, teacher, tokenizer, config, sampling, batch_size=3, seed=0, max_length=128
    )
    state_file = tmp_path / "state.pt"  # through the training state's file, which loads with weights_only
    torch.save(source.state_dict(), state_file)
    resumed.load_state_dict(torch.load(state_file, weights_only=True))
    assert all(
        torch.equal(a, b) for a, b in zip(resumed.batch(3).values(), source.batch(3).values(), strict=True)
    )
    source.batch(4)
    assert source.round_index == 1 and source.rollouts != rollouts
