"""The one sampling function: probe rollouts, the teacher's continuations, on-policy KD and evaluation.

Batched `generate` with the KV cache and left padding. Every generated token carries the model's own
log-probability (raw logits, temperature 1, no top-p/top-k filtering), which is what the check stage
compares with the teacher.

Two backends behind the same interface (`SamplingConfig.backend`, docs/sampling.md):

* ``transformers`` (the default, the tested one): `model.generate` on the model in memory.
* ``vllm`` (optional, `pip install '.[vllm]'`, a GPU): a `vllm.LLM` engine built from the checkpoint
  folder the model was loaded from. vllm is imported only when this backend runs.

Several processes (`accelerate launch`, torchrun): callers that pass the same prompts on every process
may ask for `across_processes=True`; each process then generates a share of the batches and every
process gets the whole list back, in order. With one process nothing changes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from warmup_distill_kedro.core.errors import UserInputError
from warmup_distill_kedro.core.generation.config import Generation, SamplingConfig
from warmup_distill_kedro.core.generation.mixed import TeacherMix
from warmup_distill_kedro.core.generation.vllm_backend import require_backend, vllm_generate
from warmup_distill_kedro.core.models.chat import end_of_turn_id, render_prompts
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids
from warmup_distill_kedro.core.processes import gather_in_order, is_main_process, process_share

logger = logging.getLogger(__name__)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    config: SamplingConfig,
    desc: str = "generate",
    across_processes: bool = False,
) -> list[Generation]:
    """Continue each prompt text; results come back in the order of `prompts`. With
    `config.prompt_format` chat, each prompt is rendered with the tokenizer's chat template first.

    `across_processes`: see `generate_from_ids`.
    """
    _check_backend(config, desc)  # before tokenizing: a backend that cannot run fails before any work
    rendered = render_prompts(tokenizer, prompts, config.prompt_format, f"{desc}: prompt_format")
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in rendered]
    return generate_from_ids(
        model, tokenizer, prompt_ids, config, desc=desc, across_processes=across_processes
    )


@torch.no_grad()
def generate_from_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    config: SamplingConfig,
    desc: str = "generate",
    across_processes: bool = False,
    teacher_mix: TeacherMix | None = None,
) -> list[Generation]:
    """Continue each prompt (token ids); results come back in the order of `prompt_ids`.

    A response ends at EOS, or with `config.prompt_format` chat at the template's end-of-turn token
    (`finished`, `eos_logprob` and the cut are about that token).

    `teacher_mix`: sample from alpha p + (1 - alpha) q, p the teacher's distribution (MiniLLM; mixed.py);
    the logprobs returned are still the model's own, log q.

    Prompts are sorted longest first and cut into batches of `config.batch_size`; batch `b` samples
    under the seed `config.seed * 1_000_003 + b`, so the same prompts, order and batch size give the
    same samples whatever ran before.

    `across_processes=True` (a collective: every process must call it with the same arguments) splits
    the batches round-robin across the processes when torch.distributed is initialized with world size
    > 1, and gathers the results so every process returns the full list in the original order. A batch
    keeps its composition and its seed, so N processes sample what one process samples, up to the
    device's floating-point determinism (bit for bit on CPU; the test checks it); results are
    deterministic for a given N and batch size in any case. With one process, or without the flag,
    nothing changes. Leave it False where processes hold different prompts (on-policy KD inside
    data-parallel training).
    """
    _check_backend(config, desc)
    if config.backend == "vllm":
        if config.prompt_format == "chat":
            raise UserInputError(f"{desc}: prompt_format chat runs on backend transformers, not vllm yet")
        if teacher_mix is not None:
            raise ValueError(
                f"{desc}: sampling mixed with the teacher runs on backend transformers, not vllm"
            )
        return vllm_generate(model, tokenizer, prompt_ids, config, desc)
    _, pad_id = eos_and_pad_ids(tokenizer)
    eos_id = end_of_turn_id(tokenizer, config.prompt_format)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Longest first: batches of similar length waste little on padding; results are put back in order.
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    results: list[Generation | None] = [None] * len(prompt_ids)
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    mine = process_share(len(batches), across_processes)
    progress = config.show_progress and is_main_process()
    for batch_index in tqdm(mine, desc=desc, disable=not progress):
        rows = batches[batch_index]
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
            mix = (
                None
                if teacher_mix is None
                else teacher_mix.processor(attention_mask.to(device), len(tokenizer))
            )
            output = _generate_batch(
                model,
                input_ids.to(device),
                attention_mask.to(device),
                config,
                eos_id,
                pad_id,
                len(tokenizer),
                mix,
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
    return gather_in_order(results, across_processes)


def _generate_batch(
    model,
    input_ids,
    attention_mask,
    config: SamplingConfig,
    eos_id: int,
    pad_id: int,
    n_tokens: int,
    processor: LogitsProcessor | None = None,
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
        logits_processor=LogitsProcessorList([processor]) if processor is not None else None,
    )


def _check_backend(config: SamplingConfig, desc: str) -> None:
    if config.backend == "vllm":
        require_backend(desc)
