"""core/warmup/check.py, the teacher as checker: scoring, check rules, corrections, and a teacher with another
tokenizer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from tests.helpers import MATH_CORPUS, SMALL_UNTIED, bpe_tokenizer
from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.generation.sampling import generate, generate_from_ids
from warmup_distill_kedro.core.models.modeling import build_model
from warmup_distill_kedro.core.models.tokenization import vocabulary_fingerprint
from warmup_distill_kedro.core.warmup.check import (
    CheckConfig,
    Rollout,
    ScoredResponse,
    align_logprobs,
    check_rollouts,
    correct_rollouts,
    flag_tokens,
    replace_flagged,
    retokenize_response,
    score_responses,
    token_at_char,
    token_char_starts,
)

torch.set_num_threads(1)

PROMPTS = ["Question: Tom has 12 apples and buys 5 more. How many now?\nAnswer:", "Question: Mia has 9 pens"]


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(MATH_CORPUS)


@pytest.fixture(scope="module")
def other_tokenizer():
    """A teacher tokenizer with other merges: the same text becomes other tokens."""
    return bpe_tokenizer(MATH_CORPUS, 270)


@pytest.fixture(scope="module")
def student(tokenizer):
    return build_model(SMALL_UNTIED, tokenizer, seed=0)


@pytest.fixture(scope="module")
def rollouts(student, tokenizer) -> list[Rollout]:
    sampling = SamplingConfig(do_sample=True, max_new_tokens=12, batch_size=4, seed=3, show_progress=False)
    generations = generate(student, tokenizer, PROMPTS * 2, sampling)
    return [
        Rollout(
            p,
            g.text,
            g.token_ids,
            token_char_starts(tokenizer, g.token_ids),
            g.logprobs,
            g.finished,
            g.eos_logprob,
        )
        for p, g in zip(PROMPTS * 2, generations, strict=True)
    ]


def _config(**overrides) -> CheckConfig:
    defaults = {
        "batch_size": 3,
        "continuation": SamplingConfig(max_new_tokens=6, batch_size=4, show_progress=False),
    }
    return CheckConfig(**{**defaults, **overrides})


# -- offsets and alignment --------------------------------------------------------------------------------
def test_char_starts_cut_the_text_into_the_tokens(tokenizer):
    ids = tokenizer(" 12 + 5 = 17. #### 17", add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids)
    starts = token_char_starts(tokenizer, ids)
    ends = [*starts[1:], len(text)]
    assert starts[0] == 0
    assert [text[s:e] for s, e in zip(starts, ends, strict=True)] == [tokenizer.decode([i]) for i in ids]


def test_retokenize_response_offsets_and_eos(other_tokenizer):
    text = " 9 - 4 = 5. #### 5"
    ids, starts = retokenize_response(other_tokenizer, text, finished=True)
    assert ids[-1] == other_tokenizer.eos_token_id and starts[-1] == len(text)
    assert other_tokenizer.decode(ids[:-1]) == text
    assert starts[:-1] == sorted(starts[:-1]) and starts[0] == 0
    unfinished, _ = retokenize_response(other_tokenizer, text, finished=False)
    assert unfinished == ids[:-1]


def test_token_at_char():
    starts = [0, 3, 5, 9]
    assert [token_at_char(starts, c) for c in (0, 2, 3, 4, 5, 8, 9, 20)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_align_logprobs_is_identity_on_the_same_cuts_and_sums_merged_tokens():
    logprobs = [-0.1, -0.2, -0.3, -0.4]
    np.testing.assert_allclose(align_logprobs([0, 2, 4, 7], logprobs, [0, 2, 4, 7]), logprobs, rtol=1e-6)
    merged = align_logprobs([0, 2, 4, 7], logprobs, [0, 4])  # the target cuts the text into 2 tokens
    np.testing.assert_allclose(merged, [-0.3, -0.7], rtol=1e-6)
    assert merged.sum() == pytest.approx(sum(logprobs))  # no probability mass is lost or invented


# -- scoring --------------------------------------------------------------------------------------------
def test_score_responses_matches_a_float64_forward_one_sequence_at_a_time(student, tokenizer):
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    responses = [
        tokenizer(" 12 + 5 = 17", add_special_tokens=False)["input_ids"],
        tokenizer(" 4", add_special_tokens=False)["input_ids"],
    ]
    scored = score_responses(student, prompts, responses, batch_size=2, top_k=3, show_progress=False)
    for prompt, response, (logprobs, argmax, in_top_k) in zip(prompts, responses, scored, strict=True):
        with torch.no_grad():
            logits = student(input_ids=torch.tensor([prompt + response])).logits[0].double()
        reference = logits[len(prompt) - 1 : -1].log_softmax(-1)
        expected = reference.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1).numpy()
        assert logprobs.dtype == np.float32
        np.testing.assert_allclose(logprobs, expected, atol=1e-5)
        assert argmax.tolist() == reference.argmax(-1).tolist()
        top3 = reference.topk(3, dim=-1).indices
        assert in_top_k.tolist() == [t in row for t, row in zip(response, top3.tolist(), strict=True)]


def test_a_teacher_identical_to_the_student_reproduces_the_sampled_logprobs(student, tokenizer, rollouts):
    checked = check_rollouts(
        student,
        tokenizer,
        rollouts,
        same_vocabulary=True,
        config=_config(rule="margin", tau=1e-3),
        show_progress=False,
    )
    for rollout, result in zip(rollouts, checked, strict=True):
        n = len(rollout.token_ids)
        np.testing.assert_allclose(result.scored.logprobs[:n], rollout.logprobs, atol=1e-4)
        assert result.scored.token_ids[:n] == rollout.token_ids
        assert not result.flags.any()  # the margin log q - log p is 0 everywhere
        assert result.first_flag == -1
        if rollout.finished:  # the EOS decision is scored too
            assert result.scored.token_ids[-1] == tokenizer.eos_token_id
            assert result.scored.logprobs[-1] == pytest.approx(rollout.eos_logprob, abs=1e-4)


def test_embedding_rows_past_the_tokenizer_stay_out_of_the_teachers_probabilities(
    student, tokenizer, rollouts
):
    """Qwen2.5 pads its embeddings past the tokenizer: those rows name no token and get no mass."""
    padded = copy.deepcopy(student)
    padded.resize_token_embeddings(len(tokenizer) + 7)
    with torch.no_grad():  # rows that would take real mass if they were in the softmax
        torch.manual_seed(0)
        padded.get_output_embeddings().weight[len(tokenizer) :] = (
            torch.randn(7, SMALL_UNTIED.hidden_size) * 0.5
        )
    checked = check_rollouts(
        padded, tokenizer, rollouts, same_vocabulary=True, config=_config(), show_progress=False
    )
    for rollout, result in zip(rollouts, checked, strict=True):
        n = len(rollout.token_ids)
        np.testing.assert_allclose(result.scored.logprobs[:n], rollout.logprobs, atol=1e-4)


# -- rules ----------------------------------------------------------------------------------------------
def _scored(probabilities, in_top_k=None) -> ScoredResponse:
    n = len(probabilities)
    return ScoredResponse(
        list(range(n)), list(range(n)), np.log(np.asarray(probabilities, dtype=np.float32)),
        np.zeros(n, dtype=int), np.asarray(in_top_k if in_top_k is not None else [True] * n),
    )  # fmt: skip


def test_check_rules():
    scored = _scored([0.9, 0.05, 0.5, 0.09], in_top_k=[True, False, True, True])
    assert flag_tokens(scored, None, _config(rule="teacher_prob", tau=0.1)).tolist() == [
        False,
        True,
        False,
        True,
    ]
    assert flag_tokens(scored, None, _config(rule="top_k", top_k=5)).tolist() == [False, True, False, False]
    student = np.log(np.asarray([0.9, 0.06, 0.99, 0.09], dtype=np.float32))
    # log q - log p: 0, log(1.2) = 0.18, log(1.98) = 0.68, 0
    assert flag_tokens(scored, student, _config(rule="margin", tau=0.5)).tolist() == [
        False,
        False,
        True,
        False,
    ]
    with pytest.raises(ValueError, match="margin.*student"):
        flag_tokens(scored, None, _config(rule="margin", tau=0.5))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rule": "teacher_prob", "tau": 1.5}, "tau must be in \\(0, 1\\) for rule 'teacher_prob'"),
        ({"rule": "teacher_prob", "tau": 0.0}, "tau must be in \\(0, 1\\)"),
        ({"rule": "margin", "tau": -1.0}, "tau must be >= 0 for rule 'margin'"),
        ({"rule": "entropy"}, "rule"),
        ({"strategy": "rewrite"}, "strategy"),
    ],
)
def test_bad_check_config_is_refused_by_name(overrides, message):
    with pytest.raises(ValidationError, match=message):
        CheckConfig(**overrides)


# -- corrections ----------------------------------------------------------------------------------------
def test_continue_keeps_the_prefix_and_replace_only_swaps_tokens(student, tokenizer, rollouts):
    config = _config(rule="teacher_prob", tau=0.5)  # a random teacher: most tokens are flagged
    checked = check_rollouts(student, tokenizer, rollouts, True, config, show_progress=False)
    assert any(c.first_flag >= 0 for c in checked)
    corrected = correct_rollouts(student, tokenizer, rollouts, checked, config)
    for rollout, result, correction in zip(rollouts, checked, corrected, strict=True):
        if result.first_flag < 0:
            assert correction is None
            continue
        text = correction.text
        prefix = tokenizer.decode(result.scored.token_ids[: result.first_flag], skip_special_tokens=True)
        assert text.startswith(prefix)
        assert prefix == rollout.response[: result.scored.char_starts[result.first_flag]]

    replaced = correct_rollouts(
        student, tokenizer, rollouts, checked, _config(rule="teacher_prob", tau=0.5, strategy="replace_only")
    )
    result, correction = next((c, t) for c, t in zip(checked, replaced, strict=True) if t is not None)
    expected = [
        int(a) if f else t
        for t, a, f in zip(result.scored.token_ids, result.scored.argmax, result.flags, strict=True)
    ]
    ended = tokenizer.eos_token_id in expected
    if ended:
        expected = expected[: expected.index(tokenizer.eos_token_id)]
    assert correction.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert correction.finished == ended
    unchanged = replace_flagged(tokenizer, result.scored, np.zeros(len(result.flags), dtype=bool))
    assert unchanged.text == tokenizer.decode(
        [t for t in result.scored.token_ids if t != tokenizer.eos_token_id], skip_special_tokens=True
    )
    assert unchanged.finished == (tokenizer.eos_token_id in result.scored.token_ids)


def test_a_correction_ends_where_the_teacher_ended_it(student, tokenizer, rollouts):
    """`continue`: the correction is finished when the teacher's continuation emitted EOS, not when it was
    cut at continuation.max_new_tokens. `replace_only`: when an EOS survived the replacement."""
    config = _config(rule="teacher_prob", tau=0.5)
    checked = check_rollouts(student, tokenizer, rollouts, True, config, show_progress=False)
    flagged = [i for i, c in enumerate(checked) if c.first_flag >= 0]
    cut = config.model_copy(
        update={"continuation": config.continuation.model_copy(update={"max_new_tokens": 1})}
    )
    short = [correct_rollouts(student, tokenizer, rollouts, checked, cut)[i] for i in flagged]
    assert any(not correction.finished for correction in short)  # one new token: cut, unless it was EOS
    generous = correct_rollouts(student, tokenizer, rollouts, checked, config)
    continuations = generate_from_ids(
        student,
        tokenizer,
        [
            tokenizer(rollouts[i].prompt, add_special_tokens=False)["input_ids"]
            + checked[i].scored.token_ids[: checked[i].first_flag]
            for i in flagged
        ],
        config.continuation.model_copy(update={"do_sample": False}),
    )
    assert [generous[i].finished for i in flagged] == [g.finished for g in continuations]

    eos = tokenizer.eos_token_id
    scored = ScoredResponse(
        [5, 6, eos], [0, 1, 2], np.zeros(3, np.float32), np.array([7, eos, 9]), np.ones(3, bool)
    )
    assert replace_flagged(tokenizer, scored, np.array([False, False, False])).finished  # its EOS stayed
    assert not replace_flagged(tokenizer, scored, np.array([False, False, True])).finished  # EOS swapped away
    teachers = replace_flagged(tokenizer, scored, np.array([False, True, False]))  # the teacher's EOS at 1
    assert teachers.finished and teachers.text == tokenizer.decode([5])


def test_a_teacher_with_another_tokenizer(student, tokenizer, other_tokenizer, rollouts):
    assert vocabulary_fingerprint(tokenizer) != vocabulary_fingerprint(other_tokenizer)
    teacher = build_model(SMALL_UNTIED, other_tokenizer, seed=1)
    config = _config(rule="teacher_prob", tau=0.5)
    checked = check_rollouts(
        teacher, other_tokenizer, rollouts, same_vocabulary=False, config=config, show_progress=False
    )
    for rollout, result in zip(rollouts, checked, strict=True):
        ids, starts = retokenize_response(other_tokenizer, rollout.response, rollout.finished)
        assert (
            result.scored.token_ids == ids and result.scored.char_starts == starts
        )  # the teacher's own tokens
        # The student's log-probs are carried over onto the teacher's tokens without loss.
        total = sum(rollout.logprobs) + (rollout.eos_logprob if rollout.finished else 0.0)
        assert result.student_logprobs.sum() == pytest.approx(total, abs=1e-4)
    corrected = correct_rollouts(teacher, other_tokenizer, rollouts, checked, config)
    pairs = [(r, c, t) for r, c, t in zip(rollouts, checked, corrected, strict=True) if t is not None]
    assert pairs
    for rollout, result, correction in pairs:
        flag_char = result.scored.char_starts[result.first_flag]
        assert correction.text.startswith(
            rollout.response[:flag_char]
        )  # the prefix before the flag is the student's


class BigramTeacher(torch.nn.Module):
    """A teacher whose probabilities are known exactly: the next-token distribution depends only on the
    previous token, p(next | prev) = softmax(table[prev])."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table.float(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        return type("Output", (), {"logits": self.table[input_ids]})()


def test_every_rule_on_a_teacher_with_known_probabilities(tokenizer):
    vocab = len(tokenizer)
    a, b, c, d = (tokenizer.convert_tokens_to_ids(t) for t in ("1", "2", "3", "4"))
    probs = torch.full((vocab, vocab), 1e-9)
    probs[:, a] = 1.0  # after anything (the prompt's last token too), "1" is near certain
    probs[a, :] = 1e-9
    probs[a, b], probs[a, d] = 0.05, 0.95  # after "1": "2" is unlikely (p 0.05), "4" the teacher's pick
    probs[b, :] = 1e-9
    probs[b, c], probs[b, a] = 0.6, 0.4  # after "2": "3" likely (0.6)
    teacher = BigramTeacher((probs / probs.sum(-1, keepdim=True)).log())
    text = tokenizer.decode([a, b, c])
    rollout = Rollout(
        "Question:",
        text,
        [a, b, c],
        token_char_starts(tokenizer, [a, b, c]),
        [-0.1, -0.1, -3.0],
        finished=False,
    )

    def verdict(**overrides):
        checked = check_rollouts(
            teacher, tokenizer, [rollout], True, _config(**overrides), show_progress=False
        )
        return checked[0]

    result = verdict(rule="teacher_prob", tau=0.1)
    np.testing.assert_allclose(np.exp(result.scored.logprobs), [1.0, 0.05, 0.6], atol=1e-4)
    assert result.flags.tolist() == [False, True, False] and result.first_flag == 1
    assert verdict(rule="teacher_prob", tau=0.7).flags.tolist() == [False, True, True]
    # log q - log p: -0.1 - 0 = -0.1, -0.1 - log 0.05 = 2.9, -3.0 - log 0.6 = -2.5
    assert verdict(rule="margin", tau=1.0).flags.tolist() == [False, True, False]
    assert verdict(rule="top_k", top_k=1).flags.tolist() == [
        False,
        True,
        False,
    ]  # "3" is the argmax after "2"
    assert verdict(rule="top_k", top_k=2).flags.tolist() == [False, False, False]  # "2" is second after "1"

    [replaced] = correct_rollouts(teacher, tokenizer, [rollout], [result], _config(strategy="replace_only"))
    assert replaced.text == tokenizer.decode([a, d, c])  # the flagged "2" became the teacher's "4"
