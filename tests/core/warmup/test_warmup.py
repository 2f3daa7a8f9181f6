"""core/warmup/warmup.py: the rows the warmup trains on, an EOS only after the sides that ended, the
fairness control's rows, and dropout off in the policy."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from tests.helpers import TINY, bpe_tokenizer, tiny_checkpoint, tiny_splits
from warmup_distill_kedro.core.tasks import training_texts
from warmup_distill_kedro.core.warmup.preference import encode_preference_pairs
from warmup_distill_kedro.core.warmup.warmup import WarmupConfig, training_rows, warmup_student

torch.set_num_threads(1)

TRAINING = {"max_steps": 1, "batch_size": 4, "learning_rate": 1e-3, "log_every": 1, "show_progress": False}


def _corrected(chosen_finished, rejected_finished, kinds=None) -> pd.DataFrame:
    n = len(chosen_finished)
    return pd.DataFrame(
        {
            "prompt_id": [f"id{i}" for i in range(n)],
            "prompt": [f"Question: {i} + 1?\nAnswer:" for i in range(n)],
            "chosen": [f" {i} + 1 = {i + 1} #### {i + 1}" for i in range(n)],
            "rejected": [f" {i} + 1 = {i + 2}" for i in range(n)],
            "chosen_finished": chosen_finished,
            "rejected_finished": rejected_finished,
            "kind": kinds or ["pair"] * n,
        }
    )


def test_pairs_with_a_cut_side_are_kept_or_dropped():
    table = _corrected([True, True, False, True], [True, False, True, None], ["pair", "pair", "pair", "sft"])
    keep = WarmupConfig(training=TRAINING)
    assert training_rows(table, keep)["prompt_id"].tolist() == ["id0", "id1", "id2"]
    drop = WarmupConfig(training=TRAINING, cut_off="drop")
    assert training_rows(table, drop)["prompt_id"].tolist() == ["id0"]
    sft = WarmupConfig(training=TRAINING, cut_off="drop", loss={"loss": "sft"})
    assert training_rows(table, sft)["prompt_id"].tolist() == [
        "id0",
        "id3",
    ]  # an sft row has no rejected side
    with pytest.raises(
        ValueError, match="every row of the corrected set has a side cut.*warmup.cut_off is drop"
    ):
        training_rows(_corrected([False], [True]), drop)


def test_a_corrected_set_of_the_older_format_is_refused():
    table = _corrected([True], [True]).drop(columns=["chosen_finished", "rejected_finished"])
    with pytest.raises(ValueError, match=r"no column 'chosen_finished'.*older version.*--pipeline=check"):
        training_rows(table, WarmupConfig(training=TRAINING))


def test_each_side_ends_with_eos_only_if_it_ended():
    tokenizer = bpe_tokenizer(["Question: 1 + 1?\nAnswer: 1 + 1 = 2 #### 2"] * 10)
    eos = tokenizer.eos_token_id
    pairs = encode_preference_pairs(
        tokenizer, ["Question: 1 + 1?\nAnswer:"] * 3, [" 2"] * 3, [" 3"] * 3, 32,
        chosen_finished=[True, False, True], rejected_finished=[False, True, True],
    )  # fmt: skip
    assert [p.chosen.input_ids[-1] == eos for p in pairs] == [True, False, True]
    assert [p.rejected.input_ids[-1] == eos for p in pairs] == [False, True, True]


def test_the_policy_trains_without_dropout_so_step_zero_margins_are_zero():
    """A student with attention dropout: the reference scored the pairs in eval mode; the policy's first
    step (train mode) must score them the same, or every DPO margin starts as dropout noise."""
    train, validation, _ = tiny_splits()
    tokenizer = bpe_tokenizer(training_texts(pd.concat([train, validation])))
    student = tiny_checkpoint(tokenizer, TINY, seed=3)
    student.model.config.attention_dropout = 0.5
    for module in student.model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    math = train[train["task"] == "math"].head(8)
    corrected = pd.DataFrame(
        {
            "prompt_id": math["example_id"], "prompt": math["prompt"], "chosen": math["response"],
            "rejected": math["response"].str[:-1], "chosen_finished": True, "rejected_finished": True,
            "kind": "pair",
        }
    ).reset_index(drop=True)  # fmt: skip
    config = WarmupConfig(loss={"loss": "dpo", "beta": 1.0}, training=TRAINING, validation_examples=4)
    _, metrics = warmup_student(student, corrected, validation, config)
    [first] = [record for record in metrics["history"] if "loss" in record]
    assert abs(first["reward_margin"]) < 1e-5
    assert first["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)  # -log sigmoid(0)
    assert student.model.model.layers[0].self_attn.attention_dropout == 0.5  # the given student is untouched


def test_the_teacher_reference_needs_the_teacher_and_its_tokens():
    train, validation, _ = tiny_splits()
    tokenizer = bpe_tokenizer(training_texts(pd.concat([train, validation])))
    student = tiny_checkpoint(tokenizer, TINY, seed=3)
    other = tiny_checkpoint(bpe_tokenizer(["a different corpus, a different vocabulary"] * 20), TINY, seed=4)
    config = WarmupConfig(
        loss={"loss": "dpo", "reference": "teacher"}, training=TRAINING, validation_examples=4
    )
    corrected = _corrected([True], [True])
    with pytest.raises(ValueError, match="reference is teacher but the warmup node got no teacher_model"):
        warmup_student(student, corrected, validation, config)
    with pytest.raises(ValueError, match=r"tokenizers differ .*use reference: student"):
        warmup_student(student, corrected, validation, config, teacher=other)
