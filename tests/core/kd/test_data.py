"""core/kd/data.py: the KD examples every cell shares, the sft baseline's examples, and student-sampled KD
batches (on-policy mixing, the adaptive schedule, replay, determinism)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from tests.helpers import TINY, bpe_tokenizer
from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.kd.data import (
    KDDataConfig,
    StudentSampledBatches,
    prepare_kd_examples,
    select_sft_examples,
)
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX, encode_pairs
from warmup_distill_kedro.core.models.modeling import build_model

torch.set_num_threads(1)

CORPUS = ["Question: Tom has 12 apples and buys 5 more.\nAnswer: 12 + 5 = 17. #### 17"] * 20
PROMPTS = [f"Question: Tom has {n} apples and buys 5 more.\nAnswer:" for n in range(8)]


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(TINY, tokenizer, seed=0)


@pytest.fixture(scope="module")
def gold(tokenizer):
    encoded, _ = encode_pairs(tokenizer, PROMPTS, [" 5 #### 5"] * len(PROMPTS), max_length=64)
    return encoded


def _source(gold, model, tokenizer, **config) -> StudentSampledBatches:
    sampling = SamplingConfig(do_sample=True, max_new_tokens=5, show_progress=False)
    return StudentSampledBatches(
        gold, model, tokenizer, KDDataConfig(sampling=sampling, **config), batch_size=4, seed=0, max_length=64
    )


def test_lmbda_zero_is_gold_and_one_is_all_student_samples(gold, model, tokenizer):
    off = _source(gold, model, tokenizer, mode="on_policy", lmbda=0.0)
    for position in range(4):
        assert off.batch(position)["labels"].ne(IGNORE_INDEX).sum() > 0
    assert off.counts == {"gold": 4, "sampled": 0, "replayed": 0}

    on = _source(gold, model, tokenizer, mode="on_policy", lmbda=1.0)
    sampled = on.batch(0)
    assert on.counts["sampled"] == 1
    gold_batch = off.batch(0)  # the same position: the same prompts
    for row in range(4):
        prompt = gold_batch["labels"][row].eq(IGNORE_INDEX) & gold_batch["attention_mask"][row].bool()
        n = int(prompt.sum())
        # The student answered the same prompt; only its answer is trained on.
        assert torch.equal(sampled["input_ids"][row, :n], gold_batch["input_ids"][row, :n])
        assert sampled["labels"][row, :n].eq(IGNORE_INDEX).all()


def test_the_same_seed_and_position_give_the_same_batch(gold, model, tokenizer):
    first = _source(gold, model, tokenizer, mode="on_policy", lmbda=0.5)
    second = _source(gold, model, tokenizer, mode="on_policy", lmbda=0.5)
    for position in (3, 0, 5):  # any order: choices depend on the position, not on history
        a, b = first.batch(position), second.batch(position)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.counts == second.counts and first.counts["gold"] > 0 and first.counts["sampled"] > 0


def test_adaptive_share_grows_when_validation_stalls_and_replays(gold, model, tokenizer):
    source = _source(
        gold, model, tokenizer, mode="adaptive", initial_share=0.0, share_step=0.5, replay_ratio=0.9
    )
    assert source.share == 0.0
    source.observe_validation(1.0)  # first value: an improvement over +inf
    assert source.share == 0.0
    source.observe_validation(1.2)  # stalled
    assert source.share == 0.5
    source.observe_validation(0.8)  # improved
    assert source.share == 0.5
    source.observe_validation(0.9)
    assert source.share == 1.0
    batches = [source.batch(p) for p in range(8)]
    assert source.counts["sampled"] >= 1 and source.counts["replayed"] >= 1
    assert source.counts["sampled"] + source.counts["replayed"] == 8
    assert len(source.replay) == source.counts["sampled"]
    assert batches[0]["input_ids"].shape[0] == 4

    restored = _source(gold, model, tokenizer, mode="adaptive")
    restored.load_state_dict(source.state_dict())
    assert restored.share == 1.0 and len(restored.replay) == len(source.replay)


def test_off_policy_modes_are_refused(gold, model, tokenizer):
    with pytest.raises(ValueError, match="on_policy and adaptive"):
        _source(gold, model, tokenizer, mode="off_policy")


# -- the examples ---------------------------------------------------------------------------------------------
TRAIN = pd.DataFrame(
    {
        "prompt": [f"p{i}" for i in range(6)],
        "response": [f"r{i}" for i in range(6)],
        "example_id": list("abcdef"),
    }
)


@pytest.mark.parametrize("mode", ["off_policy", "on_policy", "adaptive"])
def test_kd_examples_are_the_selected_training_examples_with_their_gold_response(mode):
    """Without sequence_kd the teacher writes nothing (None is never asked)."""
    examples = prepare_kd_examples(None, TRAIN, KDDataConfig(mode=mode, skip_examples=1, max_examples=3))
    assert examples["example_id"].tolist() == ["b", "c", "d"]
    assert examples.index.tolist() == [0, 1, 2]
    assert (examples["gold_response"] == examples["response"]).all()
    assert examples["response"].tolist() == ["r1", "r2", "r3"]


def test_no_kd_example_left_names_the_parameter():
    with pytest.raises(ValueError, match=r"distill\.data\.skip_examples=6 \(6 in the training split\)"):
        prepare_kd_examples(None, TRAIN, KDDataConfig(skip_examples=6))


def test_the_sft_baseline_learns_the_first_gold_examples():
    assert select_sft_examples(TRAIN, 2)["example_id"].tolist() == ["a", "b"]
    assert select_sft_examples(TRAIN.iloc[3:], None).index.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="no training examples for the sft baseline"):
        select_sft_examples(TRAIN.head(0), 5)
