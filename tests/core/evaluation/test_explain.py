"""core/evaluation/explain.py: the exact split of KL(p || q) at the teacher's top token against a float64
formula, token classes on the embedded tokenizer's tokens, per-token records (response tokens only, each
value against a float64 pass over one unpadded example), and the means and changes built from them."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import (
    EXPLAIN_CLASSES,
    EXPLAIN_TASKS,
    MATH_CORPUS,
    SMALL,
    TINY,
    bpe_tokenizer,
    explain_records,
    tiny_checkpoint,
    token_ids,
)
from warmup_distill_kedro.core.evaluation import explain
from warmup_distill_kedro.core.evaluation.evaluate import EvaluateConfig
from warmup_distill_kedro.core.evaluation.explain import (
    ALL,
    MEASURES,
    POSITION_BUCKETS,
    RECORD_COLUMNS,
    TOKEN_CLASSES,
    ExplainConfig,
    changes,
    group_means,
    headline,
    kl_top_split,
    position_bucket,
    rejected_token_classes,
    token_class,
    token_classes,
    token_records,
)
from warmup_distill_kedro.core.evaluation.likelihood import heldout_distribution
from warmup_distill_kedro.core.models.encoding import encode_examples
from warmup_distill_kedro.core.tasks import RESPONSE_SEPARATOR


# ------------------------------------------------------------------------------------------ the split
def _split_float64(teacher_logits: torch.Tensor, student_logits: torch.Tensor):
    """KL(p || q), KL(b_p || b_q), (1 - p_k) KL(p~ || q~) and 1 - p_k, row by row, from the definitions in
    float64."""
    kl, top, rest, rest_mass = [], [], [], []
    for t_row, s_row in zip(teacher_logits.double(), student_logits.double(), strict=True):
        p, q = t_row.softmax(-1), s_row.softmax(-1)
        k = int(p.argmax())
        others = torch.arange(len(p)) != k
        b_p = torch.stack([p[k], p[others].sum()])
        b_q = torch.stack([q[k], q[others].sum()])
        p_tilde, q_tilde = p[others] / p[others].sum(), q[others] / q[others].sum()
        kl.append(float(torch.xlogy(p, p).sum() - (p * q.log()).sum()))
        top.append(float((torch.xlogy(b_p, b_p) - b_p * b_q.log()).sum()))
        rest.append(float(b_p[1] * (torch.xlogy(p_tilde, p_tilde) - p_tilde * q_tilde.log()).sum()))
        rest_mass.append(float(b_p[1]))
    return np.array(kl), np.array(top), np.array(rest), np.array(rest_mass)


def _logits(kind: str, rows: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
    if kind == "peaked":  # one token holds all but ~1e-9 of the mass
        logits[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=generator)] += 25.0
    elif kind == "near_uniform":
        logits = logits * 1e-3
    elif kind == "wide":
        logits = logits * 4.0
    return logits


@pytest.mark.parametrize("teacher_kind", ["random", "peaked", "near_uniform", "wide"])
@pytest.mark.parametrize("student_kind", ["random", "peaked", "near_uniform"])
def test_the_kl_split_matches_the_float64_identity(teacher_kind, student_kind):
    teacher = _logits(teacher_kind, 64, 50, seed=0)
    student = _logits(student_kind, 64, 50, seed=1)
    kl_ref, top_ref, rest_ref, rest_mass = _split_float64(teacher, student)
    np.testing.assert_allclose(top_ref + rest_ref, kl_ref, rtol=1e-9, atol=1e-12)  # the identity itself

    kl, top, rest = kl_top_split(teacher.float().log_softmax(-1), student.float().log_softmax(-1))
    assert kl.dtype == top.dtype == rest.dtype == torch.float32 and kl.shape == (64,)
    np.testing.assert_allclose(kl.numpy(), kl_ref, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(top.numpy(), top_ref, rtol=1e-4, atol=2e-6)
    # The rest in log space: its error scales with its mass (float32 log-probabilities resolve ~1e-6), so
    # even the ~1e-9 a peaked teacher leaves off its top token keeps its digits (1 - p_k in float32 would not).
    assert (np.abs(rest.numpy() - rest_ref) <= 1e-3 * np.abs(rest_ref) + 2e-6 * rest_mass).all()
    np.testing.assert_allclose((top + rest).numpy(), kl.numpy(), rtol=1e-4, atol=2e-6)


def test_the_split_keeps_leading_dimensions_and_zero_probabilities():
    teacher = torch.tensor([[[0.0, -torch.inf, -torch.inf], [1.0, 0.5, -torch.inf]]])  # [1, 2, 3]
    student = torch.tensor([[[0.2, 0.1, 0.0], [0.0, 0.0, 0.0]]])
    kl, top, rest = kl_top_split(teacher.log_softmax(-1), student.log_softmax(-1))
    assert kl.shape == top.shape == rest.shape == (1, 2)
    assert torch.isfinite(kl).all() and torch.isfinite(rest).all()
    # A certain teacher: everything is about its token; the rest has no mass.
    q0 = student[0, 0].softmax(-1)[0]
    assert float(top[0, 0]) == pytest.approx(-float(q0.log()), rel=1e-6) and float(rest[0, 0]) == 0.0
    kl_ref, _, rest_ref, _ = _split_float64(teacher[0, 1:].nan_to_num(neginf=-1e4), student[0, 1:])
    assert float(kl[0, 1]) == pytest.approx(kl_ref[0], rel=1e-5)
    assert float(rest[0, 1]) == pytest.approx(rest_ref[0], rel=1e-5)


# -------------------------------------------------------------------------------------- token classes
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 7", "digit"),
        ("17", "digit"),
        (" +", "operator"),
        (" =", "operator"),
        ("×", "operator"),
        (" ####", "formatting"),
        (".", "formatting"),
        ("\n", "formatting"),
        (" ", "formatting"),
        ("\ufffd", "formatting"),  # a byte of a character the token does not complete
        (" apples", "word"),
        ("Héllo", "word"),
    ],
)
def test_token_class_of_a_decoded_token(text, expected):
    assert token_class(text) == expected
    assert token_class(text, is_eos=True) == "eos"


def test_token_classes_on_the_embedded_tokenizer():
    tokenizer = bpe_tokenizer(MATH_CORPUS)
    ids = token_ids(tokenizer, " 12 + 5 = 17. #### 17\nHow many apples") + [tokenizer.eos_token_id]
    decoded = token_classes(tokenizer, ids)
    assert [(decoded[i][0], decoded[i][1]) for i in ids] == [
        (" ", "formatting"), ("1", "digit"), ("2", "digit"), (" ", "formatting"), ("+", "operator"),
        (" ", "formatting"), ("5", "digit"), (" =", "operator"), (" ", "formatting"), ("1", "digit"),
        ("7", "digit"), (".", "formatting"), (" ####", "formatting"), (" ", "formatting"), ("1", "digit"),
        ("7", "digit"), ("\n", "formatting"), ("How", "word"), (" many", "word"), (" a", "word"),
        ("pp", "word"), ("les", "word"), ("<|endoftext|>", "eos"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("position", "bucket"),
    [(0, "0"), (1, "1"), (2, "2-3"), (3, "2-3"), (7, "4-7"), (63, "32-63"), (64, "64+"), (500, "64+")],
)
def test_position_buckets(position, bucket):
    assert position_bucket(position) == bucket
    assert bucket in POSITION_BUCKETS


# ------------------------------------------------------------------------------------------- records
EXAMPLES = pd.DataFrame(
    {
        "example_id": ["m1", "i1", "m2"],
        "task": ["math", "instruction", "math"],
        "prompt": [
            "Question: Tom has 12 apples and buys 5 more. How many now?\nAnswer:",
            "Question: Mia has 9 pens.\nAnswer:",
            "Question: Mia has 9 pens and gives away 4. How many now?\nAnswer:",
        ],
        "response": ["12 + 5 = 17. #### 17", "9", "9 - 4 = 5. #### 5"],
    }
)
EVALUATE = EvaluateConfig(heldout_examples=3, batch_size=2, max_length=64)


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(MATH_CORPUS)


@torch.no_grad()
def _reference_records(model, teacher, tokenizer, examples):
    """Each example alone (no padding), in float64: the gold response tokens' values, in order."""
    rows = []
    for prompt, response in zip(examples["prompt"], examples["response"], strict=True):
        prompt_ids = token_ids(tokenizer, prompt)
        response_ids = token_ids(tokenizer, RESPONSE_SEPARATOR + response) + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt_ids + response_ids])
        q = model.double()(input_ids=ids).logits[0, :-1].log_softmax(-1)
        p = teacher.double()(input_ids=ids).logits[0, :-1].log_softmax(-1)
        model.float(), teacher.float()
        start = len(prompt_ids) - 1  # the row that predicts the first response token
        for position, gold in enumerate(response_ids):
            p_row, q_row = p[start + position], q[start + position]
            kl, top, rest, _ = _split_float64(p_row[None], q_row[None])
            rows.append(
                {
                    "position": position,
                    "token_id": gold,
                    "nll": -float(q_row[gold]),
                    "teacher_entropy": -float((p_row.exp() * p_row).sum()),
                    "teacher_top_is_gold": int(p_row.argmax()) == gold,
                    "student_top_is_gold": int(q_row.argmax()) == gold,
                    "kl": kl[0],
                    "kl_top": top[0],
                    "kl_rest": rest[0],
                }
            )
    return pd.DataFrame(rows)


def test_records_are_the_gold_response_tokens_against_a_float64_pass(tokenizer):
    teacher = tiny_checkpoint(tokenizer, SMALL, seed=1)
    student = tiny_checkpoint(tokenizer, TINY, seed=2)
    records = token_records(
        student, teacher, EXAMPLES, ExplainConfig(), EVALUATE, "vanilla.fkl", "vanilla", "fkl"
    )
    assert list(records.columns) == RECORD_COLUMNS
    expected = _reference_records(student.model, teacher.model, tokenizer, EXAMPLES)
    # No prompt or padding rows: exactly the response tokens and the EOS, in order, positions from 0.
    assert records["token_id"].tolist() == expected["token_id"].tolist()
    assert records["position"].tolist() == expected["position"].tolist()
    sizes = records.groupby("example_id", sort=False).size()
    assert sizes.index.tolist() == ["m1", "i1", "m2"] and sizes.tolist() == [
        len(token_ids(tokenizer, RESPONSE_SEPARATOR + r)) + 1 for r in EXAMPLES["response"]
    ]
    assert records.groupby("example_id")["token_class"].last().eq("eos").all()
    assert set(records["token_class"]) <= set(TOKEN_CLASSES)
    assert records.loc[records["example_id"] == "i1", "task"].eq("instruction").all()
    for column in ("nll", "teacher_entropy", "kl", "kl_top", "kl_rest"):
        np.testing.assert_allclose(records[column], expected[column], rtol=1e-4, atol=1e-5, err_msg=column)
    for column in ("teacher_top_is_gold", "student_top_is_gold"):
        assert records[column].tolist() == expected[column].tolist(), column
    assert (
        records[["subject", "variant", "objective"]].drop_duplicates().values
        == [["vanilla.fkl", "vanilla", "fkl"]]
    ).all()


def test_the_mean_of_the_records_is_evaluates_heldout_kl(tokenizer):
    teacher = tiny_checkpoint(tokenizer, SMALL, seed=1)
    student = tiny_checkpoint(tokenizer, TINY, seed=2)
    records = token_records(student, teacher, EXAMPLES, ExplainConfig(), EVALUATE, "s", "v", "o")
    encoded, _ = encode_examples(tokenizer, EXAMPLES, EVALUATE.max_length)
    held_out = heldout_distribution(student.model, teacher.model, encoded, 1, 2, len(tokenizer))
    assert records["kl"].mean() == pytest.approx(held_out["heldout_kl"], rel=1e-5)
    assert records["nll"].mean() == pytest.approx(held_out["heldout_nll"], rel=1e-5)
    # explain.examples caps the examples, the first of evaluate's held-out ones.
    two = token_records(student, teacher, EXAMPLES, ExplainConfig(examples=2), EVALUATE, "s", "v", "o")
    assert two["example_id"].unique().tolist() == ["m1", "i1"]
    capped = EVALUATE.model_copy(update={"heldout_examples": 1})
    assert token_records(student, teacher, EXAMPLES, ExplainConfig(), capped, "s", "v", "o")[
        "example_id"
    ].unique().tolist() == ["m1"]


def test_records_do_not_depend_on_how_many_rows_are_split_at_once(tokenizer, monkeypatch):
    teacher = tiny_checkpoint(tokenizer, SMALL, seed=1)
    student = tiny_checkpoint(tokenizer, TINY, seed=2)
    whole = token_records(student, teacher, EXAMPLES, ExplainConfig(), EVALUATE, "s", "v", "o")
    monkeypatch.setattr(explain, "ROWS_PER_CHUNK", 3)  # not a divisor of any batch's response tokens
    chunked = token_records(student, teacher, EXAMPLES, ExplainConfig(), EVALUATE, "s", "v", "o")
    pd.testing.assert_frame_equal(chunked, whole)


def test_the_teacher_against_itself_has_no_divergence(tokenizer):
    teacher = tiny_checkpoint(tokenizer, SMALL, seed=1)
    records = token_records(
        teacher, teacher, EXAMPLES, ExplainConfig(), EVALUATE, "teacher", "teacher", "teacher"
    )
    assert records[["kl", "kl_top", "kl_rest"]].abs().max().max() < 1e-6
    assert (records["teacher_top_is_gold"] == records["student_top_is_gold"]).all()


def test_a_model_with_another_tokenizer_gets_its_nll_and_no_kl(tokenizer, caplog):
    teacher = tiny_checkpoint(bpe_tokenizer(MATH_CORPUS, vocab_size=280), SMALL, seed=1)
    student = tiny_checkpoint(tokenizer, TINY, seed=2)
    with caplog.at_level(logging.INFO, logger="warmup_distill_kedro.core.evaluation.explain"):
        records = token_records(student, teacher, EXAMPLES, ExplainConfig(), EVALUATE, "s", "v", "o")
    assert "tokenizer differs from the teacher's" in caplog.text and "no token-level KL" in caplog.text
    assert np.isfinite(records["nll"]).all() and (records["nll"] > 0).all()
    assert records[["kl", "kl_top", "kl_rest", "teacher_entropy"]].isna().all().all()
    assert records["teacher_top_is_gold"].isna().all() and records["student_top_is_gold"].notna().all()
    means = group_means([records])
    assert means["kl"].isna().all() and means["nll"].notna().all()


# ------------------------------------------------------------------------------------------ aggregates
CLASSES, TASKS = EXPLAIN_CLASSES, EXPLAIN_TASKS
BEFORE_KL, BEFORE_NLL = [1.0, 3.0, 2.0, 4.0, 8.0], [2.0, 2.0, 1.0, 1.0, 5.0]


def test_group_means_by_class_position_and_task():
    before = explain_records("vanilla.before_kd", BEFORE_KL, BEFORE_NLL, CLASSES, TASKS)
    table = group_means([before])

    def mean(task, by, group, measure="kl"):
        [value] = table[(table["task"] == task) & (table["by"] == by) & (table["group"] == group)][measure]
        return value

    assert mean(ALL, "class", "digit") == 2.0 and mean("math", "class", "digit") == 2.0
    assert mean(ALL, "class", ALL) == mean(ALL, "position", ALL) == pytest.approx(18 / 5)
    assert mean("instruction", "class", "eos", "nll") == 5.0
    assert mean(ALL, "position", "2-3") == 3.0 and mean(ALL, "position", "4-7") == 8.0
    assert mean(ALL, "class", "digit", "kl_top") == 0.5 and mean(ALL, "class", "digit", "kl_rest") == 1.5
    assert mean(ALL, "class", ALL, "student_top_is_gold") == 1.0
    assert mean(ALL, "class", ALL, "teacher_top_is_gold") == 0.0
    digits = table[(table["task"] == ALL) & (table["group"] == "digit")]
    assert digits["tokens"].tolist() == [2]
    # Classes in TOKEN_CLASSES order, absent ones left out (no formatting token here).
    assert table[(table["task"] == ALL) & (table["by"] == "class")]["group"].tolist() == [
        "digit", "operator", "eos", "word", ALL,
    ]  # fmt: skip
    assert "formatting" not in set(table["group"])


def test_changes_are_after_minus_before_group_by_group():
    before = explain_records("vanilla.before_kd", BEFORE_KL, BEFORE_NLL, CLASSES, TASKS)
    after = explain_records(
        "vanilla.fkl", [0.5, 1.5, 2.0, 1.0, 2.0], [1.0, 2.0, 1.0, 0.5, 1.0], CLASSES, TASKS
    )
    changed = changes(group_means([before, after]), [("vanilla.before_kd", "vanilla.fkl")])
    digit = changed[(changed["task"] == ALL) & (changed["group"] == "digit")].iloc[0]
    assert (digit["comparison"], digit["baseline"], digit["variant"], digit["objective"]) == (
        "vanilla.fkl", "vanilla.before_kd", "vanilla", "fkl",
    )  # fmt: skip
    assert digit["delta_kl"] == -1.0 and digit["delta_nll"] == -0.5 and digit["tokens"] == 2
    assert digit["delta_kl_top"] == -0.25 and digit["delta_kl_rest"] == -0.75
    eos = changed[(changed["task"] == "instruction") & (changed["group"] == "eos")].iloc[0]
    assert eos["delta_kl"] == -6.0 and eos["delta_nll"] == -4.0
    assert {f"delta_{m}" for m in MEASURES} <= set(changed.columns)
    assert headline(changed) == {
        "vanilla.fkl": {"delta_kl": pytest.approx(-11 / 5), "delta_kl_top": pytest.approx(-11 / 20),
                        "delta_kl_rest": pytest.approx(-33 / 20), "delta_nll": pytest.approx(-5.5 / 5)},
    }  # fmt: skip
    with pytest.raises(ValueError, match="no token records for subject 'warmup.before_kd'"):
        changes(group_means([before]), [("warmup.before_kd", "vanilla.before_kd")])


def test_rejected_token_classes_from_the_corrected_set(tokenizer):
    corrected = pd.DataFrame(
        {
            "kind": ["pair", "pair", "pair", "pair", "sft"],
            "rejected": [" 12 + 5 = 18. #### 18", " 9 - 4 = 5. #### 5", " 9 - 4", " How many", " 3"],
            "flag_char": [10, 3, 6, 1, 1],  # '8', '-', the end (EOS), 'How'; the sft row does not count
        }
    )
    rejected = rejected_token_classes(corrected, tokenizer).set_index("token_class")
    assert rejected.index.tolist() == list(TOKEN_CLASSES)
    assert rejected["rejected"].to_dict() == {"digit": 1, "operator": 1, "eos": 1, "formatting": 0, "word": 1}
    assert rejected["rejected_share"].sum() == pytest.approx(1.0)
    assert rejected["token_share"].sum() == pytest.approx(1.0)
    assert rejected.loc["eos", "token_share"] == 0.0  # the texts hold no EOS token
    with pytest.raises(ValueError, match="corrected_set has no column 'flag_char'"):
        rejected_token_classes(corrected.drop(columns="flag_char"), tokenizer)
