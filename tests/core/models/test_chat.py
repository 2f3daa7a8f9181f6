"""Prompts in a chat model's template (`prompt_format: chat`): rendered per tokenizer, generation stops at
the end-of-turn token, losses cover the response and that token only."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.helpers import MATH_CORPUS, answering_model, bpe_tokenizer
from warmup_distill_kedro.core.errors import UserInputError
from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.generation.sampling import generate
from warmup_distill_kedro.core.models.chat import end_of_turn_id, render_prompts, user_message
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX, encode_examples

# ChatML, as SmolLM2 and Qwen2.5 write it.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT = "Question: What is 2+3?\nAnswer:"


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = bpe_tokenizer(MATH_CORPUS + ["user assistant"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def test_a_chat_prompt_is_a_user_turn_opening_the_assistants(chat_tokenizer):
    assert user_message(PROMPT) == "Question: What is 2+3?"
    assert user_message("Instruction: Sort 3, 1.\nResponse:") == "Instruction: Sort 3, 1."
    assert user_message("no cue here") == "no cue here"
    (rendered,) = render_prompts(chat_tokenizer, [PROMPT], "chat", "p")
    assert rendered == "<|im_start|>user\nQuestion: What is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompts(chat_tokenizer, [PROMPT], "plain", "p") == [PROMPT]


def test_the_end_of_turn_is_what_the_template_writes_after_a_reply(chat_tokenizer):
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(chat_tokenizer, "chat") == im_end
    assert end_of_turn_id(chat_tokenizer, "plain") == chat_tokenizer.eos_token_id != im_end


def test_chat_without_a_template_is_refused_naming_the_parameter():
    with pytest.raises(
        UserInputError, match=r"^evaluate\.sampling\.prompt_format: chat, but .* no chat template"
    ):
        render_prompts(bpe_tokenizer(MATH_CORPUS), [PROMPT], "chat", "evaluate.sampling.prompt_format")


def test_the_loss_covers_the_response_and_the_end_of_turn_only(chat_tokenizer):
    examples = pd.DataFrame({"prompt": [PROMPT], "response": ["2 + 3 = 5\n#### 5"]})
    (chat,), _ = encode_examples(chat_tokenizer, examples, max_length=200, prompt_format="chat")
    (plain,), _ = encode_examples(chat_tokenizer, examples, max_length=200)
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt_ids = chat_tokenizer(
        render_prompts(chat_tokenizer, [PROMPT], "chat", "p")[0], add_special_tokens=False
    )["input_ids"]
    response_ids = chat_tokenizer("2 + 3 = 5\n#### 5", add_special_tokens=False)["input_ids"]
    assert chat.input_ids == prompt_ids + response_ids + [im_end]
    assert chat.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [im_end]
    plain_prompt = chat_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert plain.input_ids[: len(plain_prompt)] == plain_prompt  # plain: unchanged, the prompt as it is
    assert plain.labels[-1] == chat_tokenizer.eos_token_id  # and EOS after the response


def test_chat_generation_stops_at_the_end_of_turn(chat_tokenizer):
    (rendered,) = render_prompts(chat_tokenizer, [PROMPT], "chat", "p")
    model = answering_model(chat_tokenizer, {rendered: "2 + 3 = 5<|im_end|>and more", PROMPT: " 9"})
    config = SamplingConfig(max_new_tokens=40, show_progress=False, prompt_format="chat")
    (answer,) = generate(model, chat_tokenizer, [PROMPT], config)
    assert answer.text == "2 + 3 = 5" and answer.finished
    assert answer.eos_logprob is not None
    (plain,) = generate(model, chat_tokenizer, [PROMPT], config.model_copy(update={"prompt_format": "plain"}))
    assert plain.text == " 9" and plain.finished  # the plain prompt, ended by EOS


# -- probe -> check -> warmup in the student's chat template -------------------------------------------------
def _chat_checkpoint(tokenizer, seed: int):
    from tests.helpers import SMALL_UNTIED, tiny_checkpoint

    checkpoint = tiny_checkpoint(tokenizer, size=SMALL_UNTIED, seed=seed)
    checkpoint.model.resize_token_embeddings(len(tokenizer))
    return checkpoint


def test_the_probe_samples_in_chat_and_the_check_reads_the_same_prompts(chat_tokenizer):
    import numpy as np
    import torch

    from tests.helpers import tiny_splits
    from warmup_distill_kedro.core.warmup.check import CheckConfig
    from warmup_distill_kedro.core.warmup.corrected_set import build_corrected_set, score_rollouts
    from warmup_distill_kedro.core.warmup.probe import ProbeConfig, probe

    student, teacher = _chat_checkpoint(chat_tokenizer, 0), _chat_checkpoint(chat_tokenizer, 1)
    train, _, _ = tiny_splits(math_examples=12, instruction_examples=2)
    config = ProbeConfig(
        n_samples=1, max_new_tokens=6, max_prompts=4, show_progress=False, prompt_format="chat"
    )
    rollouts = probe(student, train, config)
    assert set(rollouts["prompt_format"]) == {"chat"}

    check = CheckConfig(show_progress=False)
    scored = score_rollouts(rollouts, teacher, check)
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    row = scored.iloc[0]
    (rendered,) = render_prompts(chat_tokenizer, [row["prompt"]], "chat", "p")
    prompt_ids = chat_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    response_ids = list(row["token_ids"]) + ([im_end] if row["finished"] else [])
    assert list(row["teacher_token_ids"]) == response_ids
    with torch.no_grad():
        logits = teacher.model(torch.tensor([prompt_ids + response_ids])).logits[0].float()
    expected = logits.log_softmax(-1)[len(prompt_ids) - 1 : -1].gather(
        -1, torch.tensor(response_ids)[:, None]
    )
    np.testing.assert_allclose(row["teacher_logprobs"], expected[:, 0].numpy(), rtol=1e-4, atol=1e-5)

    corrected, _ = build_corrected_set(scored, teacher, check.model_copy(update={"tau": 0.99}))
    assert set(corrected["prompt_format"]) == {"chat"}


def test_a_chat_probe_without_a_template_stops_before_sampling():
    from tests.helpers import tiny_checkpoint, tiny_splits
    from warmup_distill_kedro.core.warmup.probe import ProbeConfig, probe

    tokenizer = bpe_tokenizer(MATH_CORPUS)
    train, _, _ = tiny_splits(math_examples=12, instruction_examples=2)
    with pytest.raises(UserInputError, match=r"^probe\.prompt_format: chat, but .* no chat template"):
        probe(
            tiny_checkpoint(tokenizer),
            train,
            ProbeConfig(n_samples=1, show_progress=False, prompt_format="chat"),
        )


def test_warmup_pairs_end_with_the_end_of_turn(chat_tokenizer):
    from warmup_distill_kedro.core.warmup.preference import encode_preference_pairs

    (pair,) = encode_preference_pairs(
        chat_tokenizer, [PROMPT], ["5"], ["6 and"], 200, chosen_finished=True, rejected_finished=False,
        prompt_format="chat",
    )  # fmt: skip
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    five = chat_tokenizer("5", add_special_tokens=False)["input_ids"]
    assert [t for t in pair.chosen.labels if t != IGNORE_INDEX] == five + [im_end]
    assert im_end not in pair.rejected.labels  # a side cut at its budget gets no end of turn


def test_evaluation_in_chat_runs_every_measure_in_the_template_and_refuses_a_base_judge(chat_tokenizer):
    from tests.helpers import tiny_checkpoint, tiny_splits
    from warmup_distill_kedro.core.evaluation.evaluate import EvaluateConfig, evaluate_model
    from warmup_distill_kedro.core.warmup.check import CheckConfig

    _, _, test = tiny_splits(math_examples=20, instruction_examples=5)
    sampling = SamplingConfig(max_new_tokens=4, show_progress=False, prompt_format="chat")
    config = EvaluateConfig(
        math_examples=3, instruction_examples=2, rouge_seeds=[0], sampling=sampling, heldout_examples=4,
        check_prompts=2,
    )  # fmt: skip
    student, teacher = _chat_checkpoint(chat_tokenizer, 0), _chat_checkpoint(chat_tokenizer, 1)
    metrics, predictions = evaluate_model(
        student, teacher, test, config, CheckConfig(), "s", "vanilla", "fkl"
    )
    assert metrics["math"]["n_examples"] == 3 and metrics["distribution"]["heldout_kl"] is not None
    assert metrics["math"]["headline"] == "exact_match"

    base = tiny_checkpoint(bpe_tokenizer(MATH_CORPUS))
    with pytest.raises(
        UserInputError, match=r"^evaluate\.sampling\.prompt_format: chat, but .* no chat template"
    ):
        evaluate_model(student, base, test, config, CheckConfig(), "s", "vanilla", "fkl")


# -- the KD examples and every distill cell in the template --------------------------------------------------
def _distill_config(prompt_format: str, mode: str = "sequence_kd"):
    from warmup_distill_kedro.core.kd.cell import DistillConfig

    sampling = {"max_new_tokens": 6, "show_progress": False, "prompt_format": prompt_format}
    training = {"max_steps": 1, "batch_size": 4, "learning_rate": 1e-3, "show_progress": False}
    return DistillConfig(
        max_length=192, validation_examples=4, data={"mode": mode, "max_examples": 4, "sampling": sampling},
        training=training,
    )  # fmt: skip


@pytest.mark.parametrize("objective", ["fkl", "dskd", "sft"])
def test_kd_examples_are_written_and_distilled_in_chat(chat_tokenizer, objective):
    from tests.helpers import tiny_splits
    from warmup_distill_kedro.core.kd.cell import distill_cell
    from warmup_distill_kedro.core.kd.data import prepare_kd_examples

    student, teacher = _chat_checkpoint(chat_tokenizer, 0), _chat_checkpoint(chat_tokenizer, 1)
    train, validation, _ = tiny_splits(math_examples=20, instruction_examples=4)
    config = _distill_config("chat")
    examples = prepare_kd_examples(teacher, train, config.data)
    assert set(examples["prompt_format"]) == {"chat"}
    assert not any(r.startswith(" ") for r in examples["response"])  # no separator: the turn opened already
    distilled, metrics = distill_cell(teacher, student, examples, validation, config, "vanilla", objective)
    assert metrics["steps"] == distilled.metadata["steps"] == 1
    assert distilled.metadata["params"]["data"]["sampling"]["prompt_format"] == "chat"


def test_kd_examples_of_another_format_or_a_base_model_are_refused(chat_tokenizer):
    from tests.helpers import tiny_checkpoint, tiny_splits
    from warmup_distill_kedro.core.kd.cell import distill_cell
    from warmup_distill_kedro.core.kd.data import prepare_kd_examples

    student, teacher = _chat_checkpoint(chat_tokenizer, 0), _chat_checkpoint(chat_tokenizer, 1)
    train, validation, _ = tiny_splits(math_examples=20, instruction_examples=4)
    examples = prepare_kd_examples(teacher, train, _distill_config("plain", "off_policy").data)
    with pytest.raises(
        UserInputError, match=r"prompt_format is chat but the KD examples were prepared in \['plain'\]"
    ):
        distill_cell(
            teacher, student, examples, validation, _distill_config("chat", "off_policy"), "vanilla", "fkl"
        )
    base = tiny_checkpoint(bpe_tokenizer(MATH_CORPUS))
    with pytest.raises(
        UserInputError, match=r"^distill\.data\.sampling\.prompt_format: chat, but .* no chat template"
    ):
        prepare_kd_examples(base, train, _distill_config("chat").data)


def test_the_teacher_cache_of_chat_examples_is_what_a_chat_cell_reads(chat_tokenizer):
    import torch

    from tests.helpers import tiny_splits
    from warmup_distill_kedro.core.kd.cache import TeacherCacheConfig, cache_teacher
    from warmup_distill_kedro.core.kd.data import prepare_kd_examples

    teacher = _chat_checkpoint(chat_tokenizer, 1)
    train, _, _ = tiny_splits(math_examples=20, instruction_examples=4)
    examples = prepare_kd_examples(teacher, train, _distill_config("chat").data)
    cache = cache_teacher(
        teacher, examples, TeacherCacheConfig(top_k=4, show_progress=False), 1.0, 192, "error"
    )
    encoded, _ = encode_examples(chat_tokenizer, examples, 192, prompt_format="chat")
    for i, example in enumerate(encoded):
        ids, logprobs, _ = cache.rows(i)
        positions = [p for p, label in enumerate(example.labels[1:]) if label != IGNORE_INDEX]
        assert ids.shape[0] == len(positions)
        with torch.no_grad():
            logits = teacher.model(torch.tensor([example.input_ids])).logits[0].float()
        assert torch.equal(ids[:, 0].long(), logits[positions].argmax(-1))  # the cache's top-1, in chat
