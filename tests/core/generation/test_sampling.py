"""core/generation/sampling.py, batched generation: left padding, seeds, EOS handling, per-token
log-probabilities, result order."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import MIXED_CORPUS, SMALL_UNTIED, bpe_tokenizer, token_ids
from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.generation.sampling import generate, generate_from_ids
from warmup_distill_kedro.core.models.modeling import build_model

torch.set_num_threads(1)

# Different token lengths, so a batch of them needs padding.
PROMPTS = ["Question: what is 12 plus 345?\nAnswer:", "The cat", "Héllo wörld! The mat sat", "7"]


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(MIXED_CORPUS)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(SMALL_UNTIED, tokenizer, seed=0)


def _config(**overrides) -> SamplingConfig:
    return SamplingConfig(**{"max_new_tokens": 8, "batch_size": 4, "show_progress": False, **overrides})


def test_prompts_have_different_lengths(tokenizer):
    assert len({len(token_ids(tokenizer, p)) for p in PROMPTS}) == len(PROMPTS)


def test_greedy_is_deterministic_and_batch_size_independent(model, tokenizer):
    batched = generate(model, tokenizer, PROMPTS, _config(batch_size=4))
    again = generate(model, tokenizer, PROMPTS, _config(batch_size=4))
    single = generate(model, tokenizer, PROMPTS, _config(batch_size=1))
    assert len(batched) == len(PROMPTS)
    assert [g.token_ids for g in batched] == [g.token_ids for g in again]
    for prompt, b, s in zip(PROMPTS, batched, single, strict=True):
        assert b.token_ids == s.token_ids, f"left padding changed the greedy continuation of {prompt!r}"
        assert b.text == s.text
        assert b.finished == s.finished
        assert b.logprobs == pytest.approx(s.logprobs, abs=1e-4)
    assert any(g.token_ids for g in batched)


def test_results_come_back_in_input_order(model, tokenizer):
    forward = generate(model, tokenizer, PROMPTS, _config(batch_size=2))
    backward = generate(model, tokenizer, PROMPTS[::-1], _config(batch_size=2))
    assert [g.token_ids for g in backward] == [g.token_ids for g in forward][::-1]
    for prompt, g in zip(PROMPTS, forward, strict=True):
        alone = generate(model, tokenizer, [prompt], _config(batch_size=1))[0]
        assert g.token_ids == alone.token_ids
    # Distinct prompts give distinct continuations on a random model, so a shuffle would be visible.
    assert len({tuple(g.token_ids) for g in forward}) > 1


def test_sampling_seeded(model, tokenizer):
    sample = _config(do_sample=True, temperature=1.0, max_new_tokens=10, seed=0)
    a = generate(model, tokenizer, PROMPTS, sample)
    b = generate(model, tokenizer, PROMPTS, sample)
    c = generate(model, tokenizer, PROMPTS, sample.model_copy(update={"seed": 1}))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    greedy = generate(model, tokenizer, PROMPTS, _config(max_new_tokens=10))
    assert [g.token_ids for g in a] != [g.token_ids for g in greedy]


def test_top_k_one_is_greedy(model, tokenizer):
    greedy = generate(model, tokenizer, PROMPTS, _config())
    top1 = generate(model, tokenizer, PROMPTS, _config(do_sample=True, top_k=1, seed=3))
    assert [g.token_ids for g in top1] == [g.token_ids for g in greedy]


def _reference_logprobs(model, prompt_ids: list[int], new_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + new_ids])).logits[0].double()
    logprobs = logits.log_softmax(-1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(new_ids))
    return logprobs[positions, torch.tensor(new_ids)]


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "temperature": 0.5, "top_p": 0.9, "seed": 2}])
def test_logprobs_are_the_raw_model_logprobs(model, tokenizer, sampling):
    """Each generated token carries log_softmax of the unprocessed logits (no temperature, no top-p)."""
    generations = generate(model, tokenizer, PROMPTS, _config(max_new_tokens=6, **sampling))
    checked = 0
    for prompt, g in zip(PROMPTS, generations, strict=True):
        assert len(g.logprobs) == len(g.token_ids)
        if not g.token_ids:
            continue
        reference = _reference_logprobs(model, token_ids(tokenizer, prompt), g.token_ids)
        assert torch.allclose(torch.tensor(g.logprobs, dtype=torch.float64), reference, atol=1e-4), prompt
        checked += 1
    assert checked >= 2


def _force(model, tokenizer, plan):
    """Make the model emit `plan(row_is_marked, step)` at each step, via hooks on the forward pass.

    A row is "marked" when its prompt contains the digit 7; the plan decides per row, independent of
    the order generate puts rows in.
    """
    marker = token_ids(tokenizer, "7")[0]
    state = {"marked": None, "step": 0}

    def pre_hook(module, args, kwargs):
        input_ids = kwargs["input_ids"]
        if input_ids.shape[1] > 1:  # the prefill: whole prompts
            state["marked"] = (input_ids == marker).any(dim=1)
            state["step"] = 0

    def head_hook(module, inputs, output):
        forced = torch.full_like(output, -1e4)
        for row, marked in enumerate(state["marked"].tolist()):
            forced[row, -1, plan(marked, state["step"])] = 1e4
        state["step"] += 1
        return forced

    return [
        model.register_forward_pre_hook(pre_hook, with_kwargs=True),
        model.lm_head.register_forward_hook(head_hook),
    ]


def test_finished_exactly_when_eos_is_produced(model, tokenizer):
    eos = tokenizer.eos_token_id
    a, b = 50, 51
    assert eos not in (a, b)

    # Marked prompts: a, b, EOS. Others: a forever.
    def plan(marked, step):
        if marked:
            return [a, b][step] if step < 2 else eos
        return a

    prompts = ["Question: 7 + 1?", "The cat sat", "7"]
    handles = _force(model, tokenizer, plan)
    try:
        long = generate(model, tokenizer, prompts, _config(max_new_tokens=5))
        short = generate(model, tokenizer, prompts, _config(max_new_tokens=2))
        just_eos = generate(model, tokenizer, prompts, _config(max_new_tokens=3))
    finally:
        for handle in handles:
            handle.remove()

    assert [g.finished for g in long] == [True, False, True]
    assert long[0].token_ids == long[2].token_ids == [a, b]  # EOS itself is not returned
    assert long[0].text == tokenizer.decode([a, b])
    assert long[1].token_ids == [a] * 5
    assert all(len(g.logprobs) == len(g.token_ids) for g in long)
    assert long[0].logprobs == pytest.approx([0.0, 0.0], abs=1e-3)  # the forced tokens are certain
    # Cut at max_new_tokens before EOS: not finished, even though EOS would have come next.
    assert [g.finished for g in short] == [False, False, False]
    assert short[0].token_ids == [a, b]
    # EOS as the very last allowed token still counts.
    assert [g.finished for g in just_eos] == [True, False, True]

    # Hooks removed: the model generates freely again.
    free = generate(model, tokenizer, prompts, _config(max_new_tokens=5))
    assert [g.token_ids for g in free] != [g.token_ids for g in long]


def test_immediate_eos_gives_empty_finished_generation(model, tokenizer):
    handles = _force(model, tokenizer, lambda marked, step: tokenizer.eos_token_id)
    try:
        generations = generate(model, tokenizer, PROMPTS, _config(max_new_tokens=4))
    finally:
        for handle in handles:
            handle.remove()
    for g in generations:
        assert g.finished and g.token_ids == [] and g.logprobs == [] and g.text == ""


def test_single_token_not_eos_is_unfinished(model, tokenizer):
    generations = generate(model, tokenizer, PROMPTS, _config(max_new_tokens=1))
    for g in generations:
        assert len(g.token_ids) + g.finished == 1
        assert g.finished == (len(g.token_ids) == 0)


def test_generate_from_ids_and_training_mode_restored(model, tokenizer):
    prompt_ids = [token_ids(tokenizer, p) for p in PROMPTS]
    model.train()
    try:
        from_ids = generate_from_ids(model, tokenizer, prompt_ids, _config())
        assert model.training
    finally:
        model.eval()
    from_text = generate(model, tokenizer, PROMPTS, _config())
    assert not model.training
    assert [g.token_ids for g in from_ids] == [g.token_ids for g in from_text]


def test_sampling_config_validation():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValidationError, match="top_p"):
        SamplingConfig(top_p=1.5)


def test_padding_rows_are_never_generated(tokenizer):
    padded = build_model(SMALL_UNTIED, tokenizer, seed=0)
    padded.resize_token_embeddings(len(tokenizer) + 40)
    ids = torch.tensor([token_ids(tokenizer, PROMPTS[0])])
    with torch.no_grad():  # make a padding row the most likely next token
        logits = padded(input_ids=ids).logits[0, -1, : len(tokenizer)]
        head = padded.get_output_embeddings().weight
        head[len(tokenizer) :] = head[int(logits.argmax())] * (3.0 if logits.max() > 0 else -3.0)
        assert int(padded(input_ids=ids).logits[0, -1].argmax()) >= len(tokenizer)  # the trap is set
    generations = generate(padded, tokenizer, PROMPTS[:1], _config(max_new_tokens=6))
    assert generations[0].token_ids and all(t < len(tokenizer) for t in generations[0].token_ids)
    # Log-probabilities are normalised over the tokenizer's ids only.
    assert generations[0].logprobs[0] == pytest.approx(float(logits.log_softmax(-1).max()), abs=1e-5)
