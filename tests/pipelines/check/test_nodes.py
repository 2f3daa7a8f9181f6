"""pipelines/check/nodes.py, each node called on its own: the teacher scores the rollouts, corrects the
flagged ones, and the histogram of its probabilities; the error of an empty probe."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from warmup_distill_kedro.pipelines.check.nodes import (
    build_corrected_set,
    plot_teacher_probabilities,
    score_rollouts,
)
from warmup_distill_kedro.pipelines.check.params import CheckParams

# An untrained teacher spreads its mass (p ~ 1/300 per token): tau 0.003 flags some rollouts, not all.
TAU = 0.003


def _params(**changes) -> CheckParams:
    values = {
        "tau": TAU,
        "continuation": {"max_new_tokens": 6, "batch_size": 8, "show_progress": False},
        "batch_size": 8,
        "show_progress": False,
    }
    return CheckParams.model_validate({**values, **changes})


def test_score_rollouts_flags_the_tokens_the_rule_rejects(rollouts, teacher):
    scored = score_rollouts(rollouts, teacher, _params())
    assert len(scored) == len(rollouts)
    assert scored[rollouts.columns].equals(rollouts)  # the rollouts, with the teacher's view added
    for row in scored.itertuples():
        # One vocabulary: the teacher reads exactly the sampled ids (and the EOS when the response ended).
        eos = [teacher.tokenizer.eos_token_id] if row.finished else []
        assert list(row.teacher_token_ids) == list(row.token_ids) + eos
        assert len(row.teacher_logprobs) == len(row.flags) == len(row.teacher_token_ids)
        expected = [bool(np.exp(lp) < TAU) for lp in row.teacher_logprobs]  # rule teacher_prob
        assert list(row.flags) == expected
        assert row.n_flagged == sum(expected)
        assert row.first_flag == (expected.index(True) if any(expected) else -1)
    assert -1 < scored["first_flag"].max() and scored["first_flag"].min() == -1  # some flagged, some not


def test_an_empty_probe_is_refused(teacher, rollouts):
    with pytest.raises(ValueError, match="the rollouts table is empty; run the probe pipeline first"):
        score_rollouts(rollouts.head(0), teacher, _params())


def test_build_corrected_set_keeps_the_corrected_rollouts_and_counts_the_rest(rollouts, teacher):
    scored = score_rollouts(rollouts, teacher, _params())
    corrected, summary = build_corrected_set(scored, teacher, _params())
    flagged = scored[scored["first_flag"] >= 0]
    assert 0 < len(corrected) <= len(flagged)
    assert set(corrected["kind"]) == {"pair"}
    assert (corrected["chosen"] != corrected["rejected"]).all()
    assert set(corrected["rejected"]) <= set(flagged["response"])
    assert summary["n_pairs"] == len(corrected)
    assert summary["n_pairs"] + summary["n_flagged_unchanged"] == len(flagged)
    assert summary["n_rollouts"] == len(rollouts)
    assert summary["share_tokens_flagged"] == pytest.approx(
        scored["n_flagged"].sum() / scored["flags"].map(len).sum()
    )

    kept, _ = build_corrected_set(scored, teacher, _params(keep_unflagged=True))
    unflagged = scored[scored["first_flag"] < 0]
    assert len(unflagged) > 0
    assert (kept["kind"] == "sft").sum() == len(unflagged)
    sft = kept[kept["kind"] == "sft"]
    assert sft["rejected"].isna().all() and sorted(sft["chosen"]) == sorted(unflagged["response"])


def test_plot_teacher_probabilities_draws_every_scored_token():
    scored = pd.DataFrame({"teacher_logprobs": [[np.log(0.2), np.log(0.9)], [np.log(0.05)]]})
    figure = plot_teacher_probabilities(scored, _params(histogram_bins=10))
    assert isinstance(figure, Figure)
    [axis] = figure.get_axes()
    assert sum(patch.get_height() for patch in axis.patches) == pytest.approx(3)  # one bar height per token
