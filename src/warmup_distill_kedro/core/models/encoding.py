"""Turn (prompt, response) text pairs into padded tensors whose loss covers the response only.

The prompt and the response are tokenized separately and concatenated, so the model sees exactly the
ids at training time that generation will start from (the prompt's ids) and continue with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import pandas as pd
import torch
import torch.nn.functional
from pydantic import Field
from transformers import PreTrainedTokenizerBase

from warmup_distill_kedro.core.errors import UserInputError
from warmup_distill_kedro.core.models.chat import PromptFormat, end_of_turn_id, render_prompts, response_text
from warmup_distill_kedro.core.tasks import RESPONSE_SEPARATOR

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


# What happens to a prompt that does not fit `max_length`: stop with the prompt named, or keep its end
# (the question usually comes last) in PROMPT_KEEP_SHARE of the length, leaving the rest to the response.
PromptOverflow = Literal["error", "keep_end"]
PROMPT_KEEP_SHARE = 0.75
# The stage parameter that declares it (bootstrap, warmup, distill, evaluate).
PromptOverflowParameter = Annotated[
    PromptOverflow,
    Field(description="a prompt longer than max_length: error (named) | keep_end (cut its start, counted)"),
]


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt positions
    truncated: bool  # the response lost its tail
    prompt_truncated: bool = False  # the prompt lost its beginning (prompt_overflow "keep_end")


@dataclass(frozen=True)
class EncodingReport:
    n_examples: int
    n_truncated: int
    n_prompts_truncated: int = 0


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int, add_eos: bool = True
) -> EncodedExample:
    """Encode one prompt + response; an over-long pair keeps its prompt and loses its response's tail."""
    encoded, _ = encode_pairs(tokenizer, [prompt], [response], max_length, add_eos)
    return encoded[0]


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
    add_eos: bool | Sequence[bool] = True,
    prompt_overflow: PromptOverflow = "error",
    prompt_format: PromptFormat = "plain",
) -> tuple[list[EncodedExample], EncodingReport]:
    """Prompt + response (+ EOS) per pair, cut to `max_length`: the response loses its tail; a prompt that
    does not fit follows `prompt_overflow`. Both kinds of cut are counted in the report.

    `add_eos`: for all pairs, or per pair: an EOS belongs only after a response that ended (a gold one, a
    generation that emitted EOS); one cut at a token budget must not teach the model to stop there.
    `prompt_format` chat: the prompt rendered with the chat template (outside the loss), the response
    ended by the template's end-of-turn token instead of EOS (inside it).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    ends = [add_eos] * len(prompts) if isinstance(add_eos, bool) else [bool(e) for e in add_eos]
    if len(ends) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(ends)} add_eos flags")
    eos_id = end_of_turn_id(tokenizer, prompt_format)
    rendered = render_prompts(tokenizer, prompts, prompt_format, "prompt_format")
    # One batched call each: the Rust tokenizer encodes a list many times faster than a Python loop.
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    encoded = [
        _assemble(
            p_ids, r_ids + ([eos_id] if end else []), max_length, prompt, prompt_overflow, prompt_format
        )
        for p_ids, r_ids, end, prompt in zip(prompt_ids, response_ids, ends, prompts, strict=True)
    ]
    report = EncodingReport(
        len(encoded), sum(e.truncated for e in encoded), sum(e.prompt_truncated for e in encoded)
    )
    return encoded, report


def _assemble(
    prompt_ids: list[int],
    response_ids: list[int],
    max_length: int,
    prompt: str,
    overflow: PromptOverflow,
    prompt_format: PromptFormat = "plain",
) -> EncodedExample:
    prompt_truncated = len(prompt_ids) >= max_length
    if prompt_truncated:
        if overflow != "keep_end":
            rendered = " in its chat template" if prompt_format == "chat" else ""
            raise UserInputError(
                f"prompt of {len(prompt_ids)} tokens{rendered} does not fit max_length {max_length}: {prompt[:80]!r}... "
                "Raise the stage's max_length, or set its prompt_overflow to keep_end (keeps the prompt's "
                f"last {PROMPT_KEEP_SHARE:.0%} of max_length tokens, and counts it)."
            )
        prompt_ids = prompt_ids[-int(max_length * PROMPT_KEEP_SHARE) :]
    room = max_length - len(prompt_ids)
    return EncodedExample(
        input_ids=prompt_ids + response_ids[:room],
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids[:room],
        truncated=len(response_ids) > room,
        prompt_truncated=prompt_truncated,
    )


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: pd.DataFrame,
    max_length: int,
    prompt_overflow: PromptOverflow = "error",
    prompt_format: PromptFormat = "plain",
) -> tuple[list[EncodedExample], EncodingReport]:
    """Encode a task table's `prompt` and `response` columns, the response after the task's separator
    (plain) or the chat template's opening of the assistant's turn (chat), followed by EOS (or the
    end-of-turn token) where the response ended (the table's `finished` column when it has one: responses
    a model wrote; gold responses have none and all end)."""
    responses = [response_text(r, RESPONSE_SEPARATOR, prompt_format) for r in examples["response"]]
    ends = examples["finished"].astype(bool).tolist() if "finished" in examples else True
    return encode_pairs(
        tokenizer,
        examples["prompt"].tolist(),
        responses,
        max_length,
        ends,
        prompt_overflow=prompt_overflow,
        prompt_format=prompt_format,
    )


def collate(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked in attention and ignored in the labels."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def shifted_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token, in float32, and the mask of positions that count.

    logits [B, T, V] predict labels shifted by one: position t scores token t+1.
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return logprobs * mask, mask


def causal_lm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean negative log-likelihood of the response tokens: the SFT loss (optionally smoothed)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    n_tokens = (targets != IGNORE_INDEX).sum()
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        label_smoothing=label_smoothing,
    ) / n_tokens.clamp(min=1)
    return loss, {"nll": loss.item(), "tokens": float(n_tokens.item())}
