"""pipelines/check/params.py: the check rule's parameters plus the histogram's; tau as a probability only
where the rule reads it as one."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from warmup_distill_kedro.pipelines.check.params import CheckParams


def test_tau_is_a_probability_for_the_teacher_prob_rule_only():
    assert CheckParams(tau=0.2).tau_probability == 0.2
    assert CheckParams(rule="margin", tau=2.0).tau_probability is None
    assert CheckParams(rule="top_k", top_k=3).tau_probability is None


def test_the_histogram_resolution_is_bounded():
    assert CheckParams().histogram_bins == 50
    for bins in (4, 501):
        with pytest.raises(ValidationError, match="histogram_bins"):
            CheckParams(histogram_bins=bins)
    with pytest.raises(ValidationError, match=r"tau must be in \(0, 1\) for rule 'teacher_prob'"):
        CheckParams(tau=1.5)
