"""core/models/encoding.py: prompt/response encoding, right-padded batches and the response-only SFT loss."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from tests.helpers import MIXED_CORPUS, TINY, bpe_tokenizer, token_ids
from warmup_distill_kedro.core.models.encoding import (
    IGNORE_INDEX,
    PROMPT_KEEP_SHARE,
    EncodedExample,
    causal_lm_loss,
    collate,
    encode_examples,
    encode_pair,
    encode_pairs,
    shifted_token_logprobs,
)
from warmup_distill_kedro.core.models.modeling import build_model
from warmup_distill_kedro.core.tasks import RESPONSE_SEPARATOR

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(MIXED_CORPUS)


@pytest.fixture(scope="module")
def model(tokenizer):
    model = build_model(TINY, tokenizer, seed=0)
    model.eval()
    return model


# -- encode_pair -----------------------------------------------------------------------------------------
def test_labels_cover_response_and_eos_only(tokenizer):
    prompt, response = "Question: what is 12 plus 3?\nAnswer:", " 15 #### 15"
    prompt_ids, response_ids = token_ids(tokenizer, prompt), token_ids(tokenizer, response)
    example = encode_pair(tokenizer, prompt, response, max_length=64)
    n = len(prompt_ids)
    assert example.input_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert len(example.labels) == len(example.input_ids)
    assert example.labels[:n] == [IGNORE_INDEX] * n
    assert example.labels[n:] == example.input_ids[n:]
    assert IGNORE_INDEX not in example.labels[n:]
    assert example.labels[-1] == tokenizer.eos_token_id
    assert not example.truncated
    assert tokenizer.decode(example.input_ids[:-1]) == prompt + response


def test_add_eos_false(tokenizer):
    example = encode_pair(tokenizer, "Question:", " 7", max_length=64, add_eos=False)
    assert tokenizer.eos_token_id not in example.input_ids
    assert example.input_ids == token_ids(tokenizer, "Question:") + token_ids(tokenizer, " 7")


def test_truncation_keeps_prompt_and_cuts_response(tokenizer):
    prompt, response = "Question: what is 12 plus 3?", " The cat sat on the mat 12345"
    prompt_ids, response_ids = token_ids(tokenizer, prompt), token_ids(tokenizer, response)
    max_length = len(prompt_ids) + 3
    assert len(response_ids) + 1 > 3
    example = encode_pair(tokenizer, prompt, response, max_length=max_length)
    assert example.truncated
    assert len(example.input_ids) == max_length
    assert example.input_ids == prompt_ids + response_ids[:3]
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids[:3]
    assert tokenizer.eos_token_id not in example.input_ids

    # Exactly fitting (response + EOS == room) is not truncation.
    exact = encode_pair(tokenizer, prompt, response, max_length=len(prompt_ids) + len(response_ids) + 1)
    assert not exact.truncated and exact.input_ids[-1] == tokenizer.eos_token_id


def test_encode_pairs_reports_truncation(tokenizer):
    prompts = ["Question:", "Question:", "Question:"]
    responses = [" 1", " The cat sat on the mat, the cat sat on the mat", " 2"]
    encoded, report = encode_pairs(tokenizer, prompts, responses, max_length=8)
    assert report.n_examples == 3
    assert report.n_truncated == 1
    assert [e.truncated for e in encoded] == [False, True, False]
    with pytest.raises(ValueError):
        encode_pairs(tokenizer, prompts, responses[:2], max_length=8)


def test_prompt_too_long_raises(tokenizer):
    prompt = "Question: what is 12 plus 345? The cat sat on the mat."
    n = len(token_ids(tokenizer, prompt))
    with pytest.raises(ValueError, match=f"prompt of {n} tokens does not fit max_length {n - 1}"):
        encode_pair(tokenizer, prompt, " 1", max_length=n - 1)
    with pytest.raises(ValueError, match="does not fit"):  # no room left for any response token
        encode_pair(tokenizer, prompt, " 1", max_length=n)


def test_a_long_prompt_follows_the_declared_policy_and_is_counted(tokenizer):
    long_prompt = "Question: what is 12 plus 345? The cat sat on the mat. The cat sat on the mat."
    prompts, responses = [long_prompt, "Question:"], [" 1", " 2"]
    n = len(token_ids(tokenizer, long_prompt))
    max_length = n - 4
    with pytest.raises(ValueError, match=r"does not fit max_length .*prompt_overflow to keep_end"):
        encode_pairs(tokenizer, prompts, responses, max_length=max_length)

    encoded, report = encode_pairs(
        tokenizer, prompts, responses, max_length=max_length, prompt_overflow="keep_end"
    )
    assert (report.n_examples, report.n_prompts_truncated) == (2, 1)
    assert [e.prompt_truncated for e in encoded] == [True, False]
    kept = int(max_length * PROMPT_KEEP_SHARE)
    first = encoded[0]
    assert first.input_ids[:kept] == token_ids(tokenizer, long_prompt)[-kept:]  # the prompt's end survives
    assert first.labels[:kept] == [IGNORE_INDEX] * kept
    # ...so does the response
    assert first.input_ids[kept:] == token_ids(tokenizer, " 1") + [tokenizer.eos_token_id]
    assert len(first.input_ids) <= max_length
    assert encoded[1] == encode_pairs(tokenizer, prompts[1:], responses[1:], max_length=max_length)[0][0]


def test_encode_examples_uses_separator(tokenizer):
    table = pd.DataFrame({"prompt": ["Question: 1+2?", "Question: 3+4?"], "response": ["3", "7 #### 7"]})
    encoded, report = encode_examples(tokenizer, table, max_length=64)
    assert report.n_examples == 2 and report.n_truncated == 0
    for example, prompt, response in zip(encoded, table["prompt"], table["response"], strict=True):
        n = len(token_ids(tokenizer, prompt))
        assert example.input_ids[:n] == token_ids(tokenizer, prompt)
        assert tokenizer.decode(example.input_ids[n:-1]) == RESPONSE_SEPARATOR + response
        assert tokenizer.decode(example.input_ids[:-1]) == prompt + RESPONSE_SEPARATOR + response


# -- collate ----------------------------------------------------------------------------------------------
def test_an_eos_only_after_responses_that_ended(tokenizer):
    """Per pair: a response cut at a token budget gets no EOS (one would teach the model to stop there)."""
    eos = tokenizer.eos_token_id
    encoded, _ = encode_pairs(tokenizer, ["a b", "a b"], [" c d", " c d"], 32, add_eos=[True, False])
    assert encoded[0].input_ids[-1] == eos and encoded[0].labels[-1] == eos
    assert eos not in encoded[1].input_ids and encoded[1].input_ids == encoded[0].input_ids[:-1]
    with pytest.raises(ValueError, match="2 prompts but 1 add_eos flags"):
        encode_pairs(tokenizer, ["a", "b"], ["c", "d"], 32, add_eos=[True])


def test_encode_examples_reads_whether_each_response_ended(tokenizer):
    """A table of responses a model wrote carries `finished`; gold tables have none and every response ends."""
    eos = tokenizer.eos_token_id
    table = pd.DataFrame({"prompt": ["a b", "a b", "a b"], "response": ["c", "c d", "d"]})
    gold, _ = encode_examples(tokenizer, table, 32)
    assert all(e.input_ids[-1] == eos for e in gold)
    written, _ = encode_examples(tokenizer, table.assign(finished=[True, False, True]), 32)
    assert [e.input_ids[-1] == eos for e in written] == [True, False, True]
    assert written[1].input_ids == gold[1].input_ids[:-1]


def test_collate_pads_right(tokenizer):
    pad = tokenizer.pad_token_id
    a = EncodedExample(
        input_ids=[5, 6, 7, 8, 9], labels=[IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9], truncated=False
    )
    b = EncodedExample(input_ids=[10, 11, 12], labels=[IGNORE_INDEX, 11, 12], truncated=False)
    batch = collate([a, b], pad_id=pad)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9],
        [IGNORE_INDEX, 11, 12, IGNORE_INDEX, IGNORE_INDEX],
    ]


# -- loss -------------------------------------------------------------------------------------------------
def _batch(tokenizer):
    encoded, _ = encode_pairs(
        tokenizer,
        ["Question: what is 12 plus 3?\nAnswer:", "The cat"],
        [" 15 #### 15", " sat on the mat. Héllo"],
        max_length=64,
    )
    assert len(encoded[0].input_ids) != len(encoded[1].input_ids)  # some padding in the batch
    return collate(encoded, tokenizer.pad_token_id)


def _reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Float64 token-mean NLL over response positions, with log-softmax written out."""
    x = logits.double()
    x = x - x.max(dim=-1, keepdim=True).values
    logprobs = x - x.exp().sum(dim=-1, keepdim=True).log()
    total, count = 0.0, 0
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[row, t + 1])
            if target != IGNORE_INDEX:
                total -= float(logprobs[row, t, target])
                count += 1
    return total / count


def test_causal_lm_loss_matches_reference(tokenizer, model):
    batch = _batch(tokenizer)
    with torch.no_grad():
        loss, metrics = causal_lm_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    n_response = int((batch["labels"] != IGNORE_INDEX).sum())
    assert metrics["tokens"] == n_response
    assert metrics["nll"] == pytest.approx(loss.item())
    assert loss.item() == pytest.approx(_reference_loss(logits, batch["labels"]), abs=1e-5)
    # Including prompt positions would give another number: the mask matters.
    everything = batch["labels"].clone()
    everything[batch["attention_mask"].bool()] = batch["input_ids"][batch["attention_mask"].bool()]
    assert abs(loss.item() - _reference_loss(logits, everything)) > 1e-3


def test_causal_lm_loss_ignores_padding(tokenizer, model):
    batch = _batch(tokenizer)
    padded = (batch["attention_mask"] == 0).nonzero()
    assert len(padded) > 0
    changed = {k: v.clone() for k, v in batch.items()}
    for row, col in padded.tolist():
        changed["input_ids"][row, col] = 42
    with torch.no_grad():
        base, _ = causal_lm_loss(model, batch)
        after, _ = causal_lm_loss(model, changed)
    assert after.item() == pytest.approx(base.item(), abs=1e-6)

    # The padded batch gives the same token-mean as the two examples scored unpadded.
    encoded_rows = []
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        encoded_rows.append(
            EncodedExample(batch["input_ids"][row, :n].tolist(), batch["labels"][row, :n].tolist(), False)
        )
    with torch.no_grad():
        sums = []
        for example in encoded_rows:
            single = collate([example], tokenizer.pad_token_id)
            loss, metrics = causal_lm_loss(model, single)
            sums.append((loss.item() * metrics["tokens"], metrics["tokens"]))
    assert base.item() == pytest.approx(sum(s for s, _ in sums) / sum(n for _, n in sums), abs=1e-5)


def test_response_labels_count(tokenizer, model):
    """The loss reads the response labels: changing one changes the loss."""
    batch = _batch(tokenizer)
    with torch.no_grad():
        base, _ = causal_lm_loss(model, batch)
        changed = {k: v.clone() for k, v in batch.items()}
        response = (batch["labels"][0] != IGNORE_INDEX).nonzero()[0, 0]
        changed["labels"][0, response] = (batch["labels"][0, response] + 1) % len(tokenizer)
        moved, _ = causal_lm_loss(model, changed)
    assert abs(moved.item() - base.item()) > 1e-6


def test_label_smoothing_changes_loss(tokenizer, model):
    batch = _batch(tokenizer)
    with torch.no_grad():
        plain, _ = causal_lm_loss(model, batch)
        smoothed, _ = causal_lm_loss(model, batch, label_smoothing=0.1)
    assert torch.isfinite(smoothed)
    assert abs(smoothed.item() - plain.item()) > 1e-4


def test_causal_lm_loss_backpropagates(tokenizer, model):
    batch = _batch(tokenizer)
    model.zero_grad(set_to_none=True)
    loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_shifted_token_logprobs(tokenizer, model):
    batch = _batch(tokenizer)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = causal_lm_loss(model, batch)
    logprobs, mask = shifted_token_logprobs(logits, batch["labels"])
    assert logprobs.shape == mask.shape == (batch["labels"].shape[0], batch["labels"].shape[1] - 1)
    assert torch.equal(mask, batch["labels"][:, 1:] != IGNORE_INDEX)
    assert torch.all(logprobs[~mask] == 0)
    assert torch.all(logprobs[mask] < 0)
    assert (-logprobs.sum() / mask.sum()).item() == pytest.approx(loss.item(), abs=1e-5)
