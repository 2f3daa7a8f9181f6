"""Prompts as a chat model expects them: rendered with its tokenizer's chat template.

The task table keeps one plain prompt per example (`Question: ...\nAnswer:`, core/tasks/schema.py). With
`prompt_format: chat`, each model renders it with its own template, a user turn followed by the opening
of the assistant's turn, so that a teacher and a student of different tokenizers each see their own
template and text stays the common currency. The response then ends with the template's end-of-turn
token (`<|im_end|>` for SmolLM2 and Qwen, `<end_of_turn>` for Gemma): generation stops there, and
losses cover the response and that token, never the template around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import pandas as pd
from pydantic import Field
from transformers import PreTrainedTokenizerBase

from warmup_distill_kedro.core.errors import UserInputError
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids

PromptFormat = Literal["plain", "chat"]
PromptFormatParameter = Annotated[
    PromptFormat,
    Field(
        description="plain: the table's prompt text as it is | chat: rendered with the tokenizer's chat template"
    ),
]
# The last line of a plain prompt cues the answer; in a chat the assistant's turn does.
ANSWER_CUES = ("Answer:", "Response:")
_MARKER = "\u2063reply\u2063"  # a text no template writes, to find what follows an assistant message


def require_chat_template(tokenizer: PreTrainedTokenizerBase, parameter: str) -> None:
    """Refuse `prompt_format: chat` for a tokenizer without a chat template, before any work."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise UserInputError(
            f"{parameter}: chat, but the tokenizer of {name!r} has no chat template (a base model?); "
            "set it to plain"
        )


def user_message(prompt: str) -> str:
    """The plain prompt without its answer cue line: the assistant's turn replaces it."""
    head, _, last = prompt.rstrip().rpartition("\n")
    return head if head and last.strip() in ANSWER_CUES else prompt


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], prompt_format: PromptFormat, parameter: str
) -> list[str]:
    """Each prompt as the model reads it: as it is (plain), or as a user turn opening the assistant's (chat)."""
    if prompt_format == "plain":
        return list(prompts)
    require_chat_template(tokenizer, parameter)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message(prompt)}], add_generation_prompt=True, tokenize=False
        )
        for prompt in prompts
    ]


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase, prompt_format: PromptFormat) -> int:
    """The token that ends a response: EOS (plain), or the first special token the chat template writes
    after an assistant message (chat)."""
    eos_id, _ = eos_and_pad_ids(tokenizer)
    if prompt_format == "plain":
        return eos_id
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    after = text[text.index(_MARKER) + len(_MARKER) :]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return token_id
    return eos_id


def response_text(response: str, separator: str, prompt_format: PromptFormat) -> str:
    """The response as it follows its prompt: after the task's separator (plain), at once (chat: the
    template already opened the assistant's turn)."""
    return separator + response if prompt_format == "plain" else response


def table_prompt_format(table: pd.DataFrame) -> PromptFormat:
    """The prompt format a table's rows were sampled in (the probe's rollouts and the pairs the check made
    from them carry it), so that every later stage reads the prompts as the student did; plain for tables
    written before it was recorded."""
    formats = set(table["prompt_format"]) if "prompt_format" in table else {"plain"}
    if len(formats) != 1:
        raise ValueError(f"one table holds rows of several prompt formats: {sorted(formats)}")
    return formats.pop()
