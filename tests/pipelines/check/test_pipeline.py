"""The `check` pipeline on an in-memory catalog: the teacher scores the probe's rollouts, corrects the
flagged ones into (chosen, rejected) pairs, and draws the histogram of its probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from tests.helpers import run_pipeline
from warmup_distill_kedro.core.warmup.corrected_set import CORRECTED_SET_COLUMNS
from warmup_distill_kedro.pipelines.check.params import CheckParams
from warmup_distill_kedro.pipelines.check.pipeline import create_pipeline

PARAMS = CheckParams(
    tau=0.003,  # an untrained teacher gives every token p ~ 1/300: some rollouts flagged, not all
    continuation={"max_new_tokens": 6, "batch_size": 8, "show_progress": False},
    batch_size=8,
    show_progress=False,
    histogram_bins=10,
)


def test_scores_corrections_and_the_histogram(rollouts, teacher):
    outputs = run_pipeline(
        create_pipeline(), {"rollouts": rollouts, "teacher_model": teacher, "params:check": PARAMS}
    )
    scored, corrected, summary = (
        outputs["scored_rollouts"],
        outputs["corrected_set"],
        outputs["check_summary"],
    )

    assert len(scored) == len(rollouts) == summary["n_rollouts"] == 8
    n_tokens = sum(len(flags) for flags in scored["flags"])
    assert summary["n_scored_tokens"] == n_tokens
    assert summary["share_tokens_flagged"] == pytest.approx(scored["n_flagged"].sum() / n_tokens)
    flagged = scored[scored["first_flag"] >= 0]
    assert 0 < len(flagged) < len(scored)
    assert summary["share_rollouts_flagged"] == pytest.approx(len(flagged) / len(scored))

    assert list(corrected.columns) == CORRECTED_SET_COLUMNS
    assert len(corrected) == summary["n_pairs"] > 0
    assert (corrected["kind"] == "pair").all()
    # a correction differs from the original in its text or in how it ends
    assert (
        (corrected["chosen"] != corrected["rejected"])
        | (corrected["chosen_finished"] != corrected["rejected_finished"])
    ).all()
    by_response = flagged.set_index(["prompt_id", "sample_index"])
    for row in corrected.itertuples():
        source = by_response.loc[(row.prompt_id, row.sample_index)]
        assert row.rejected == source["response"]  # the student's own response
        assert row.rejected_finished == source["finished"]  # ...and whether it ended, as the probe sampled it
        assert row.flag_teacher_token == source["first_flag"]
        assert row.flag_char == source["teacher_char_starts"][source["first_flag"]]
        assert row.chosen[: row.flag_char] == row.rejected[: row.flag_char]  # rewritten from the flag on
        assert row.teacher_mean_logp_rejected == pytest.approx(float(np.mean(source["teacher_logprobs"])))

    # 8 new tokens at most: some rollouts were cut, and they carry it into the corrected set
    assert not scored["finished"].all() and corrected["rejected_finished"].dtype == bool
    assert set(corrected["chosen_finished"]) <= {True, False}

    histogram = outputs["teacher_prob_histogram"]
    assert isinstance(histogram, Figure)
    assert sum(patch.get_height() for patch in histogram.get_axes()[0].patches) == pytest.approx(n_tokens)
