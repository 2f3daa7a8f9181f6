"""Turn (prompt, response) text pairs into padded tensors whose loss covers the response only.

The prompt and the response are tokenized separately and concatenated, so the model sees exactly the
ids at training time that generation will start from (the prompt's ids) and continue with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional
from transformers import PreTrainedTokenizerBase

from warmup_distill_kedro.core.tasks import RESPONSE_SEPARATOR
from warmup_distill_kedro.core.tokenization import eos_and_pad_ids

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt positions
    truncated: bool


@dataclass(frozen=True)
class EncodingReport:
    n_examples: int
    n_truncated: int


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
    add_eos: bool = True,
) -> tuple[list[EncodedExample], EncodingReport]:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    eos_id, _ = eos_and_pad_ids(tokenizer)
    # One batched call each: the Rust tokenizer encodes a list many times faster than a Python loop.
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    encoded = [
        _assemble(p_ids, r_ids + ([eos_id] if add_eos else []), max_length, prompt)
        for p_ids, r_ids, prompt in zip(prompt_ids, response_ids, prompts, strict=True)
    ]
    return encoded, EncodingReport(len(encoded), sum(e.truncated for e in encoded))


def _assemble(prompt_ids: list[int], response_ids: list[int], max_length: int, prompt: str) -> EncodedExample:
    if len(prompt_ids) >= max_length:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens does not fit max_length {max_length}: {prompt[:80]!r}..."
        )
    room = max_length - len(prompt_ids)
    return EncodedExample(
        input_ids=prompt_ids + response_ids[:room],
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids[:room],
        truncated=len(response_ids) > room,
    )


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: pd.DataFrame, max_length: int
) -> tuple[list[EncodedExample], EncodingReport]:
    """Encode a task table's `prompt` and `response` columns, the response after the task's separator."""
    responses = [RESPONSE_SEPARATOR + r for r in examples["response"]]
    return encode_pairs(tokenizer, examples["prompt"].tolist(), responses, max_length)


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
