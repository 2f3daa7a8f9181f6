"""core/kd/data.py: the KD examples every cell shares, the sft baseline's examples, and student-sampled KD
batches (on-policy mixing, the adaptive schedule, replay, determinism)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from tests.helpers import TINY, bpe_tokenizer, toy_lm_loss, training_config
from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.kd.data import (
    STUDENT_SAMPLED,
    KDDataConfig,
    StudentSampledBatches,
    prepare_kd_examples,
    select_sft_examples,
)
from warmup_distill_kedro.core.models.encoding import (
    IGNORE_INDEX,
    EncodedExample,
    encode_examples,
    encode_pairs,
)
from warmup_distill_kedro.core.models.modeling import Checkpoint, build_model
from warmup_distill_kedro.core.training.loop import TrainingRun

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


def test_the_adaptive_threshold_follows_distillms_rule_on_a_scripted_validation_loss(gold, model, tokenizer):
    """DistiLLM's finetune.py: the first validation loss is the reference; a loss at least loss_eps above
    the reference raises the threshold by threshold_step (at most 1) and becomes the reference; a loss
    between the reference and reference + loss_eps changes nothing, however long it lasts."""
    source = _source(
        gold, model, tokenizer, mode="adaptive", initial_threshold=0.0, loss_eps=0.1, threshold_step=0.4
    )
    script = [  # (validation loss, threshold after it, reference after it)
        (1.00, 0.0, 1.00),  # step 0: the reference
        (1.05, 0.0, 1.00),  # not loss_eps above: nothing (today's rule "no new best" would raise it)
        (1.09, 0.0, 1.00),  # still within loss_eps of the reference, not of the last value
        (1.10, 0.4, 1.10),  # reference + loss_eps: raised, new reference
        (0.50, 0.4, 1.10),  # an improvement moves nothing
        (1.19, 0.4, 1.10),
        (1.25, 0.8, 1.25),
        (9.00, 1.0, 9.00),  # capped at 1
    ]
    for loss, threshold, reference in script:
        source.observe_validation(loss)
        assert source.threshold == pytest.approx(threshold) and source.reference_loss == reference, loss


@pytest.mark.parametrize(
    ("replay", "progress", "fresh"),
    [
        ("decreasing", 0.0, 0.8),
        ("decreasing", 0.25, 0.6),
        ("decreasing", 1.0, 0.0),
        ("constant", 0.7, 0.4),
        ("increasing", 0.25, 0.2),
    ],  # fmt: skip
)
def test_the_fresh_share_of_the_threshold_follows_the_replay_schedule(
    gold, model, tokenizer, replay, progress, fresh
):
    source = _source(gold, model, tokenizer, mode="adaptive", initial_threshold=0.8, replay=replay)
    source.begin_step(int(progress * 100), 100)
    assert source.fresh_threshold == pytest.approx(fresh)


def _draws(seed: int, positions: range) -> list[float]:
    """The first uniform draw StudentSampledBatches makes at each position."""
    import random

    return [random.Random(seed * 1_000_003 + p).random() for p in positions]


def test_student_batches_are_fresh_until_the_buffer_is_full_then_replayed_as_single_examples(
    gold, model, tokenizer
):
    """With threshold 1 and the decreasing schedule at the end of training (fresh share 0): fresh samples
    until the buffer holds `capacity` examples, then only replays, each `batch_size` single examples drawn
    from the buffer; every batch from the student is marked as such (no CE on it)."""
    source = _source(gold, model, tokenizer, mode="adaptive", initial_threshold=1.0, capacity=8)
    source.begin_step(100, 100)
    assert source.fresh_threshold == 0.0
    batches = [source.batch(position) for position in range(5)]
    assert source.counts == {"gold": 0, "sampled": 2, "replayed": 3}  # 2 x 4 fill the 8-example buffer
    assert len(source.buffer) == 8
    assert all(STUDENT_SAMPLED in batch for batch in batches)
    buffered = {tuple(example.input_ids) for example in source.buffer}
    for batch in batches[2:]:
        rows = [
            tuple(ids[mask.bool()].tolist())
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
        assert len(rows) == 4 and set(rows) <= buffered and len(set(rows)) == len(rows)  # without replacement


def test_below_the_fresh_threshold_a_batch_is_sampled_even_with_a_full_buffer(gold, model, tokenizer):
    source = _source(gold, model, tokenizer, mode="adaptive", initial_threshold=0.6, capacity=4)
    source.begin_step(0, 100)  # fresh share 0.6 at the start
    draws = _draws(0, range(12))
    kinds = []
    for position, draw in enumerate(draws):
        before = dict(source.counts)
        source.batch(position)
        kinds.append(next(kind for kind in source.counts if source.counts[kind] != before[kind]))
        if draw >= 0.6:
            assert kinds[-1] == "gold", (position, draw)
        elif draw < 0.6:
            assert kinds[-1] == "sampled", (position, draw)  # fresh below the fresh threshold
    assert "gold" in kinds and "sampled" in kinds


def test_gold_batches_carry_no_student_sampled_mark(gold, model, tokenizer):
    source = _source(gold, model, tokenizer, mode="on_policy", lmbda=0.0)
    assert STUDENT_SAMPLED not in source.batch(0)
    on = _source(gold, model, tokenizer, mode="on_policy", lmbda=1.0)
    assert bool(on.batch(0)[STUDENT_SAMPLED])


def test_the_adaptive_state_comes_back_equal(gold, model, tokenizer):
    source = _source(gold, model, tokenizer, mode="adaptive", initial_threshold=1.0, capacity=8)
    source.observe_validation(2.0)
    for position in range(3):
        source.batch(position)
    restored = _source(gold, model, tokenizer, mode="adaptive")
    restored.load_state_dict(source.state_dict())
    assert restored.threshold == 1.0 and restored.reference_loss == 2.0
    assert restored.buffer == source.buffer and restored.counts == source.counts


def test_the_adaptive_state_comes_back_equal_through_the_training_state_file(gold, tokenizer, tmp_path):
    """The replay buffer, threshold and counts, saved with the run's state by `save_state` and read back by
    `resume` (weights_only: the buffer's examples are stored as plain values)."""

    def run(seed: int) -> tuple[TrainingRun, StudentSampledBatches]:
        student = build_model(TINY, tokenizer, seed=seed)
        source = _source(gold, student, tokenizer, mode="adaptive", initial_threshold=1.0, capacity=8)
        config = training_config(max_steps=3, checkpoint_every=3)
        return TrainingRun(student, toy_lm_loss, source, config, state_folder=tmp_path, name="kd"), source

    trained, source = run(seed=0)
    source.observe_validation(2.0)
    trained.run()
    assert len(source.buffer) == 8 and source.counts["replayed"] == 1  # 2 batches fill it, 1 replayed
    resumed, restored = run(seed=1)
    assert restored.buffer == [] and resumed.resume()
    assert restored.buffer == source.buffer and all(isinstance(e, EncodedExample) for e in restored.buffer)
    assert (restored.threshold, restored.reference_loss, restored.counts) == (1.0, 2.0, source.counts)


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


def _teacher_writes(monkeypatch, finished: list[bool]):
    """The teacher's sequence_kd generations, scripted: response i ended or was cut as `finished[i]`."""
    from warmup_distill_kedro.core.generation.config import Generation
    from warmup_distill_kedro.core.kd import data

    def generate(model, tokenizer, prompts, config, desc=""):
        assert config.do_sample is False  # greedy
        return [
            Generation(text=f" t{i}", token_ids=[5], logprobs=[-0.1], finished=f)
            for i, f in enumerate(finished)
        ]

    monkeypatch.setattr(data, "generate", generate)


def test_sequence_kd_carries_whether_each_teacher_response_ended(monkeypatch, tokenizer):
    _teacher_writes(monkeypatch, [True, False, True])
    config = KDDataConfig(mode="sequence_kd", max_examples=3)
    examples = prepare_kd_examples(Checkpoint(None, tokenizer), TRAIN, config)
    assert examples["response"].tolist() == ["t0", "t1", "t2"]
    assert examples["finished"].tolist() == [True, False, True]
    assert examples["gold_response"].tolist() == ["r0", "r1", "r2"]
    encoded, _ = encode_examples(tokenizer, examples, 32)
    assert [e.input_ids[-1] == tokenizer.eos_token_id for e in encoded] == [True, False, True]
    gold = prepare_kd_examples(None, TRAIN, KDDataConfig(mode="off_policy"))
    assert gold["finished"].all()  # a gold response ends


def test_sequence_kd_can_drop_the_cut_responses(monkeypatch, tokenizer):
    _teacher_writes(monkeypatch, [True, False, True])
    config = KDDataConfig(mode="sequence_kd", max_examples=3, cut_off="drop")
    examples = prepare_kd_examples(Checkpoint(None, tokenizer), TRAIN, config)
    assert examples["example_id"].tolist() == ["a", "c"] and examples["finished"].all()
    _teacher_writes(monkeypatch, [False, False])
    with pytest.raises(
        ValueError, match=r"every response the teacher wrote was cut.*max_new_tokens.*cut_off is drop"
    ):
        prepare_kd_examples(Checkpoint(None, tokenizer), TRAIN, config.model_copy(update={"max_examples": 2}))
