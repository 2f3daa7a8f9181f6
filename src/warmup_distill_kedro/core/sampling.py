"""The one sampling function: probe rollouts, the teacher's continuations, on-policy KD and evaluation.

Batched `generate` with the KV cache and left padding. Every generated token carries the model's own
log-probability (raw logits, temperature 1, no top-p/top-k filtering), which is what the check stage
compares with the teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from warmup_distill_kedro.core.tokenization import eos_and_pad_ids


class SamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(64, gt=0)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, gt=0, description="None: off")
    batch_size: int = Field(64, gt=0)
    seed: int = 0
    show_progress: bool = True


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]  # generated ids, EOS excluded
    logprobs: list[float]  # the model's log-probability of each id in token_ids
    finished: bool  # True when the model emitted EOS, False when cut at max_new_tokens
    eos_logprob: float | None = None  # the model's log-probability of the EOS that ended it, when finished


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    config: SamplingConfig,
    desc: str = "generate",
) -> list[Generation]:
    """Continue each prompt text; results come back in the order of `prompts`."""
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return generate_from_ids(model, tokenizer, prompt_ids, config, desc=desc)


@torch.no_grad()
def generate_from_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    config: SamplingConfig,
    desc: str = "generate",
) -> list[Generation]:
    eos_id, pad_id = eos_and_pad_ids(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Longest first: batches of similar length waste little on padding; results are put back in order.
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    results: list[Generation | None] = [None] * len(prompt_ids)
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    for batch_index, rows in enumerate(tqdm(batches, desc=desc, disable=not config.show_progress)):
        width = max(len(prompt_ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids = prompt_ids[i]
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            attention_mask[r, width - len(ids) :] = 1
        # One seed per batch: the same prompts, order and batch size give the same samples. The global
        # RNG is forked so that sampling does not reseed whatever the caller draws next (dropout, data).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(config.seed * 1_000_003 + batch_index)
            output = _generate_batch(
                model, input_ids.to(device), attention_mask.to(device), config, eos_id, pad_id, len(tokenizer)
            )
        new_ids = output.sequences[:, width:].cpu()
        logprobs = torch.stack(output.logits, dim=1)[..., : len(tokenizer)].float().log_softmax(-1).cpu()
        token_logprobs = logprobs.gather(-1, new_ids[:, : logprobs.shape[1]].unsqueeze(-1)).squeeze(-1)
        for r, i in enumerate(rows):
            ids = new_ids[r].tolist()
            finished = eos_id in ids
            n = ids.index(eos_id) if finished else len(ids)
            results[i] = Generation(
                text=tokenizer.decode(ids[:n], skip_special_tokens=True),
                token_ids=ids[:n],
                logprobs=token_logprobs[r, :n].tolist(),
                finished=finished,
                eos_logprob=float(token_logprobs[r, n]) if finished else None,
            )
    model.train(was_training)
    return [g for g in results if g is not None]


def _generate_batch(
    model, input_ids, attention_mask, config: SamplingConfig, eos_id: int, pad_id: int, n_tokens: int
):
    # Embedding rows beyond the tokenizer (Qwen2.5 pads 151665 ids to 151936 rows) name no token.
    rows = model.get_output_embeddings().out_features
    padding_rows = list(range(n_tokens, rows)) if rows > n_tokens else None
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=config.max_new_tokens,
        do_sample=config.do_sample,
        temperature=config.temperature if config.do_sample else None,
        top_p=config.top_p if config.do_sample else None,
        top_k=(config.top_k or 0) if config.do_sample else None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        suppress_tokens=padding_rows,
        return_dict_in_generate=True,
        output_logits=True,
    )
