"""core/evaluation/likelihood.py: held-out statistics (NLL, entropies, KL) against an independent float64
formula, their identities, and what they ignore."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from warmup_distill_kedro.core.evaluation.likelihood import heldout_distribution
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX, EncodedExample


class FixedLogits(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]] + position bias: a deterministic stand-in for a causal LM."""

    def __init__(self, vocab: int, width: int, seed: int, scale: float = 2.0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(scale * torch.randn(vocab, width, generator=generator))
        self.position = torch.nn.Parameter(torch.randn(16, width, generator=generator))

    def forward(self, input_ids, attention_mask):
        positions = torch.arange(input_ids.shape[1])
        return SimpleNamespace(logits=self.table[input_ids] + self.position[positions])


EXAMPLES = [
    EncodedExample(input_ids=[1, 2, 3, 4, 5], labels=[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], truncated=False),
    EncodedExample(input_ids=[6, 7, 2], labels=[IGNORE_INDEX, 7, 2], truncated=False),
    EncodedExample(input_ids=[3, 3, 3, 3, 1, 2], labels=[IGNORE_INDEX] * 3 + [3, 1, 2], truncated=False),
]


@torch.no_grad()
def _reference(student, teacher, examples, vocab_size):
    """Token by token in float64, one example at a time, no batching or masking tricks."""
    nll = entropy = teacher_entropy = kl = 0.0
    tokens = 0
    for example in examples:
        ids = torch.tensor([example.input_ids])
        s = student(ids, None).logits[0].double()[:, :vocab_size].log_softmax(-1)
        t = teacher(ids, None).logits[0].double()[:, :vocab_size].log_softmax(-1)
        for position in range(1, len(example.input_ids)):
            label = example.labels[position]
            if label == IGNORE_INDEX:
                continue
            p, q = t[position - 1].exp(), s[position - 1].exp()
            nll -= float(s[position - 1, label])
            entropy -= float((q * q.log()).sum())
            teacher_entropy -= float((p * p.log()).sum())
            kl += float((p * (p.log() - q.log())).sum())
            tokens += 1
    return {
        "heldout_nll": nll / tokens,
        "heldout_entropy": entropy / tokens,
        "teacher_heldout_entropy": teacher_entropy / tokens,
        "heldout_kl": kl / tokens,
    }


@pytest.mark.parametrize("batch_size", [1, 2, 3])
@pytest.mark.parametrize("vocab_size", [10, 8])  # 8: the last two logit columns are padding rows
def test_heldout_distribution_matches_float64_reference(batch_size, vocab_size):
    student, teacher = FixedLogits(10, 10, seed=0), FixedLogits(10, 10, seed=1)
    got = heldout_distribution(
        student, teacher, EXAMPLES, pad_id=0, batch_size=batch_size, vocab_size=vocab_size
    )
    expected = _reference(student, teacher, EXAMPLES, vocab_size)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_heldout_distribution_identities():
    model = FixedLogits(10, 10, seed=3)
    same = heldout_distribution(model, model, EXAMPLES, pad_id=0, batch_size=2, vocab_size=10)
    assert same["heldout_kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["heldout_entropy"] == pytest.approx(same["teacher_heldout_entropy"], rel=1e-6)
    assert 0.0 < same["heldout_entropy"] <= math.log(10) + 1e-6
    other = heldout_distribution(model, FixedLogits(10, 10, seed=4), EXAMPLES, 0, 2, 10)
    assert other["heldout_kl"] > 0.0


def test_heldout_distribution_ignores_prompt_and_padding_tokens():
    student, teacher = FixedLogits(10, 10, seed=0), FixedLogits(10, 10, seed=1)
    base = heldout_distribution(student, teacher, EXAMPLES, 0, 3, 10)
    # This stand-in model does not mix positions, so another first prompt token changes only the row that
    # predicts the second token; where that token is a prompt token too, no statistic may change.
    changed = [
        EncodedExample([9] + e.input_ids[1:], e.labels, e.truncated) if e.labels[1] == IGNORE_INDEX else e
        for e in EXAMPLES
    ]
    assert heldout_distribution(student, teacher, changed, 0, 3, 10)["heldout_nll"] == pytest.approx(
        base["heldout_nll"]
    )
    # A different pad id fills the padded rows differently: nothing may change either.
    assert heldout_distribution(student, teacher, EXAMPLES, 5, 3, 10) == pytest.approx(base)


def test_heldout_distribution_without_a_shared_vocabulary_reports_the_student_only():
    student = FixedLogits(10, 10, seed=0)
    got = heldout_distribution(student, FixedLogits(12, 12, seed=1), EXAMPLES, 0, 2, vocab_size=None)
    assert set(got) == {"heldout_nll", "heldout_entropy"}
    assert heldout_distribution(student, None, EXAMPLES, 0, 2, vocab_size=10).keys() == got.keys()


def test_heldout_distribution_needs_response_tokens():
    prompt_only = [EncodedExample([1, 2, 3], [IGNORE_INDEX] * 3, False)]
    with pytest.raises(ValueError, match="no response tokens"):
        heldout_distribution(FixedLogits(10, 10, 0), None, prompt_only, 0, 1, None)
