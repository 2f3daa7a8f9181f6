"""core/warmup/corrected_set.py: the corrected set and the check's summary on a scored table written by
hand, with the teacher's corrections scripted, so that every number of the summary is checked against a
value computed here by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from warmup_distill_kedro.core.warmup import corrected_set
from warmup_distill_kedro.core.warmup.check import CheckConfig, Correction

# Four rollouts, one vocabulary: the teacher reads the sampled tokens (and the EOS of a finished one,
# starting at the end of the text). Flags per teacher token; the teacher's correction of each.
ROLLOUTS = [
    # math, answer 3: the flag at token 2 (" 4"), corrected to the right answer -> a pair
    dict(task="math", answer="3", response="so #### 4", tokens=["so", " ####", " 4"], finished=True,
         flags=[0, 0, 1, 0], teacher_logprobs=[-0.5, -1.0, -6.0, -2.5],
         correction=Correction("so #### 3", finished=True)),
    # instruction: nothing flagged -> unflagged
    dict(task="instruction", answer="", response="the cat sat", tokens=["the", " cat", " sat"],
         finished=False, flags=[0, 0, 0], teacher_logprobs=[-1.0, -1.0, -1.0], correction=None),
    # math, answer 7: flagged at the first token, the teacher writes the same text, ended alike -> unchanged
    dict(task="math", answer="7", response="#### 7", tokens=["####", " 7"], finished=True,
         flags=[1, 0, 1], teacher_logprobs=[-4.0, -0.1, -3.0],
         correction=Correction("#### 7", finished=True)),
    # math, answer 2: flagged at token 3, the same text but ended where the original was cut -> a pair
    dict(task="math", answer="2", response="x y z w", tokens=["x", " y", " z", " w"], finished=False,
         flags=[0, 0, 0, 1], teacher_logprobs=[-1.0, -1.0, -1.0, -5.0],
         correction=Correction("x y z w", finished=True)),
]  # fmt: skip
CHOSEN_MEAN_LOGP = {"prompt 0": -1.5, "prompt 3": -0.5}  # the teacher's mean log-prob of each correction
TEACHER = SimpleNamespace(model=None, tokenizer=None)  # scripted below: no model runs


def _scored() -> pd.DataFrame:
    rows = []
    for index, rollout in enumerate(ROLLOUTS):
        starts = [sum(len(t) for t in rollout["tokens"][:i]) for i in range(len(rollout["tokens"]))]
        ids = [10 + i for i in range(len(rollout["tokens"]))]
        eos = [len(rollout["response"])] if rollout["finished"] else []
        rows.append(
            {
                "prompt_id": index, "task": rollout["task"], "prompt": f"prompt {index}",
                "answer": rollout["answer"], "sample_index": 0, "response": rollout["response"],
                "token_ids": ids, "char_starts": starts, "logprobs": [-1.0] * len(ids),
                "finished": rollout["finished"], "eos_logprob": -1.0 if rollout["finished"] else None,
                "n_tokens": len(ids), "teacher_token_ids": ids + ([0] if rollout["finished"] else []),
                "teacher_char_starts": starts + eos, "teacher_logprobs": rollout["teacher_logprobs"],
                "teacher_argmax": [0] * len(rollout["flags"]),
                "teacher_in_top_k": [True] * len(rollout["flags"]),
                "student_logprobs_aligned": [-1.0] * len(rollout["flags"]),
                "flags": [bool(f) for f in rollout["flags"]], "n_flagged": sum(rollout["flags"]),
                "first_flag": rollout["flags"].index(1) if 1 in rollout["flags"] else -1,
            }
        )  # fmt: skip
    return pd.DataFrame(rows)


@pytest.fixture
def scripted_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    """The teacher's corrections and its scores of them, as ROLLOUTS says (no model runs)."""

    def correct_rollouts(
        teacher, tokenizer, rollouts, checked, config, across_processes=False, prompt_format="plain"
    ):
        assert [c.first_flag for c in checked] == [2, -1, 0, 3]  # read back from the table
        return [rollout["correction"] for rollout in ROLLOUTS]

    def teacher_mean_logprobs(teacher, pairs, config, prompt_format="plain"):
        return [CHOSEN_MEAN_LOGP[prompt] for prompt in pairs["prompt"]]

    monkeypatch.setattr(corrected_set, "correct_rollouts", correct_rollouts)
    monkeypatch.setattr(corrected_set, "_teacher_mean_logprobs", teacher_mean_logprobs)


def test_the_check_summary_on_a_case_computed_by_hand(scripted_teacher):
    table, summary = corrected_set.build_corrected_set(_scored(), TEACHER, CheckConfig(tau=0.1))
    assert summary == {
        "rule": "teacher_prob",
        "tau": 0.1,
        "strategy": "continue",
        "n_rollouts": 4,
        "n_scored_tokens": 4 + 3 + 3 + 4,  # teacher tokens, the EOS of the finished ones included
        "share_tokens_flagged": pytest.approx((1 + 0 + 2 + 1) / 14),
        "share_rollouts_flagged": 3 / 4,
        "share_rollouts_corrected": 2 / 4,
        "n_pairs": 2,
        "n_flagged_unchanged": 1,
        "n_unflagged": 1,
        "mean_first_flag_token": pytest.approx((2 + 0 + 3) / 3),
        "mean_first_flag_fraction": pytest.approx((2 / 4 + 0 / 3 + 3 / 4) / 3),
        "teacher_mean_logp_rejected": pytest.approx((-10.0 / 4 + -8.0 / 4) / 2),  # the two pairs' originals
        "teacher_mean_logp_chosen": pytest.approx((-1.5 + -0.5) / 2),
        "math_rejected_correct": 0.0,  # "#### 4" for 3, no answer for 2
        "math_chosen_correct": 0.5,  # "#### 3" for 3 is right
    }
    assert table["kind"].tolist() == ["pair", "pair"]
    assert table["prompt"].tolist() == ["prompt 0", "prompt 3"]
    assert table["chosen"].tolist() == ["so #### 3", "x y z w"]
    assert table["rejected"].tolist() == ["so #### 4", "x y z w"]
    assert table["chosen_finished"].tolist() == [True, True]
    assert table["rejected_finished"].tolist() == [True, False]
    assert table["flag_char"].tolist() == [7, 5]  # where " 4" and " w" start
    assert table["flag_token"].tolist() == [2, 3]
    assert table["teacher_mean_logp_chosen"].tolist() == [-1.5, -0.5]

    kept, kept_summary = corrected_set.build_corrected_set(
        _scored(), TEACHER, CheckConfig(tau=0.1, keep_unflagged=True)
    )
    assert kept["kind"].tolist() == ["pair", "pair", "sft"]
    assert kept.iloc[2]["chosen"] == "the cat sat" and kept.iloc[2]["rejected"] is None
    assert kept.iloc[2]["teacher_mean_logp_chosen"] == pytest.approx(-1.0)
    assert kept_summary == summary | {"n_unflagged": 1}  # the summary counts rollouts, whatever is kept
