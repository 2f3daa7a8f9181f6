"""core/evaluation/metrics.py: Rouge-L on hand-checked cases, and the probability histogram."""

from __future__ import annotations

import numpy as np
import pytest

from warmup_distill_kedro.core.evaluation.metrics import probability_histogram, rouge_l


def test_rouge_l_identical_is_one_and_disjoint_is_zero():
    assert rouge_l("the answer is 12", ["the answer is 12"]) == pytest.approx(1.0)
    assert rouge_l("blue sky", ["green grass"]) == 0.0
    assert rouge_l("", ["anything at all"]) == 0.0


def test_rouge_l_hand_computed_f1():
    # LCS("the cat sat", "the cat sat on the mat") = 3 tokens: precision 3/3, recall 3/6, F1 = 2/3.
    assert rouge_l("the cat sat", ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    # LCS("a b c d", "a x c y") = "a c": precision 2/4, recall 2/4.
    assert rouge_l("a b c d", ["a x c y"]) == pytest.approx(0.5)


def test_rouge_l_stems_and_takes_the_best_reference():
    # Porter stemming: "cats running" and "cat run" are the same tokens.
    assert rouge_l("cats running", ["cat run"]) == pytest.approx(1.0)
    assert rouge_l("the cat sat", ["dogs bark loudly", "the cat sat on the mat"]) == pytest.approx(2 / 3)


def test_rouge_l_needs_a_reference():
    with pytest.raises(ValueError, match="reference"):
        rouge_l("text", [])


def test_probability_histogram_counts_every_value_once():
    histogram = probability_histogram(np.array([0.0, 0.04, 0.05, 0.5, 0.99, 1.0]), bins=20)
    assert len(histogram["edges"]) == 21 and histogram["edges"][0] == 0.0 and histogram["edges"][-1] == 1.0
    assert sum(histogram["counts"]) == 6
    assert histogram["counts"][0] == 2 and histogram["counts"][1] == 1 and histogram["counts"][-1] == 2
