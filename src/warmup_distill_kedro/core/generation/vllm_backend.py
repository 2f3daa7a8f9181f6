"""The optional vLLM backend of `core.generation.sampling` (`SamplingConfig.backend: vllm`, docs/sampling.md).

A `vllm.LLM` engine is built from the checkpoint folder the model was loaded from (vllm reads weights from
disk, so a model changed since it was loaded is refused) and returns the same `Generation`s as the
transformers path: the sampled ids, the model's raw log-probability of each, whether EOS ended it.
vllm itself is imported only when this backend runs; `pip install '.[vllm]'` adds it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from warmup_distill_kedro.core.generation.config import (
    VLLM_MISSING,
    Generation,
    SamplingConfig,
    vllm_is_installed,
)
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids
from warmup_distill_kedro.core.processes import process_rank_and_count

logger = logging.getLogger(__name__)


def require_backend(desc: str) -> None:
    """Fail before any work when the vllm backend cannot run here (asked for by `backend: vllm`)."""
    if not vllm_is_installed():
        raise ImportError(f"{desc}: sampling backend 'vllm' (parameter backend: vllm) {VLLM_MISSING}")
    world = process_rank_and_count()[1]
    if world > 1:
        raise ValueError(
            f"{desc}: sampling backend 'vllm' runs in one process, this run has {world}: vllm batches on "
            "its own; give it several GPUs with vllm_engine_args.tensor_parallel_size, or use "
            "backend: transformers under accelerate launch"
        )


# One engine at a time: evaluate generates several times from one model (greedy math, a Rouge-L run per
# seed, the check sample), and building an engine loads the weights and profiles the GPU.
_ENGINE: dict[str, Any] = {"key": None, "llm": None}


def vllm_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    config: SamplingConfig,
    desc: str,
) -> list[Generation]:
    """The vllm backend: the same `Generation`s, from an engine on the model's checkpoint folder."""
    folder = checkpoint_folder(model)
    verify_weights_match_folder(model, folder)
    import vllm  # the optional dependency, imported only when asked for

    eos_id, _ = eos_and_pad_ids(tokenizer)
    rows = model.get_output_embeddings().out_features
    prompts, params = vllm_requests(vllm, prompt_ids, config, eos_id, len(tokenizer), rows)
    llm = _vllm_engine(vllm, folder, _dtype_name(model), config.vllm_engine_args)
    logger.info("%s: %d prompts through vllm (%s)", desc, len(prompts), folder)
    outputs = llm.generate(prompts, params, use_tqdm=config.show_progress)
    return vllm_generations(outputs, prompt_ids, tokenizer, eos_id)


def checkpoint_folder(model: PreTrainedModel) -> Path:
    """The folder `from_pretrained` read the model from (`model.name_or_path`), which vllm loads."""
    name = getattr(model, "name_or_path", "") or ""
    folder = Path(name) if name else None
    if folder is None or not (folder / "config.json").is_file():
        raise ValueError(
            "sampling backend 'vllm' loads the model from its checkpoint folder, but this model was not "
            f"loaded from one (name_or_path {name!r}); load it with load_checkpoint / the catalog, or use "
            "backend: transformers"
        )
    return folder.resolve()


def verify_weights_match_folder(model: PreTrainedModel, folder: Path, max_elements: int = 65_536) -> int:
    """Refuse a model whose weights changed since it was loaded: vllm would sample from the folder.

    Compares every small tensor (norms, biases: any full fine-tuning moves them) of the folder's
    safetensors with the model in memory, cast to its dtype. Returns how many tensors were compared.
    """
    from safetensors import safe_open  # a transformers dependency

    state = model.state_dict()
    compared = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():
                tensor = state.get(name)
                if tensor is None or tensor.numel() > max_elements:
                    continue
                stored = weights.get_tensor(name).to(tensor.dtype)
                if stored.shape != tensor.shape or not torch.equal(stored, tensor.detach().cpu()):
                    raise ValueError(
                        f"sampling backend 'vllm' samples from the weights in {folder}, but the model in "
                        f"memory differs from them ({name}): it changed since it was loaded (trained?). "
                        "Save it first, or use backend: transformers here"
                    )
                compared += 1
    if compared == 0:
        logger.warning(
            "vllm backend: could not compare the model in memory with %s (no common tensor)", folder
        )
    return compared


def _dtype_name(model: PreTrainedModel) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _vllm_engine(vllm: Any, folder: Path, dtype: str, engine_args: dict[str, Any]) -> Any:
    reserved = sorted({"model", "logprobs_mode", "skip_tokenizer_init"} & set(engine_args))
    if reserved:
        raise ValueError(f"vllm_engine_args: {reserved} are set by the vllm backend and cannot be given")
    key = json.dumps([str(folder), dtype, engine_args], sort_keys=True, default=str)
    if _ENGINE["key"] != key:
        _ENGINE.update(key=None, llm=None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        arguments = {"dtype": dtype, "seed": 0, **engine_args}
        llm = vllm.LLM(
            model=os.fspath(folder),
            # vllm never tokenizes: prompts go in as ids, ids come out, and our tokenizer decodes them
            # (AutoTokenizer can read a tokenizer folder differently from us, docs/architecture.md).
            skip_tokenizer_init=True,
            # Log-probabilities of the unprocessed logits (before temperature, top-k/top-p, logit
            # bias): what the transformers backend returns and what the check compares.
            logprobs_mode="raw_logprobs",
            **arguments,
        )
        _ENGINE.update(key=key, llm=llm)
    return _ENGINE["llm"]


def release_vllm_engine() -> None:
    """Drop the cached engine (frees its GPU memory as far as vllm lets go of it)."""
    _ENGINE.update(key=None, llm=None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def vllm_requests(
    vllm: Any,
    prompt_ids: Sequence[list[int]],
    config: SamplingConfig,
    eos_id: int,
    n_tokens: int,
    n_rows: int,
) -> tuple[list[dict[str, list[int]]], list[Any]]:
    """One token prompt and one `SamplingParams` per prompt, in input order.

    * greedy (`do_sample` False) is temperature 0; sampling sets temperature, top_p, top_k (0: off) and
      a seed per prompt, `config.seed * 1_000_003 + index`: results do not depend on how vllm batches.
    * only our EOS ends a response (`ignore_eos` drops the model's generation-config EOS ids, as
      `eos_token_id=` does for transformers); the EOS comes back as the last token id.
    * `logprobs=0`: the log-probability of the sampled token only.
    * embedding rows past the tokenizer name no token and are never sampled: a logit bias of -inf, which
      vllm adds to their logits (a finite bias only lowers them; a row never trained down can still win).
    """
    sample = config.do_sample
    padding_bias = {row: float("-inf") for row in range(n_tokens, n_rows)} or None
    prompts = [{"prompt_token_ids": [int(t) for t in ids]} for ids in prompt_ids]
    params = [
        vllm.SamplingParams(
            n=1,
            temperature=config.temperature if sample else 0.0,
            top_p=config.top_p if sample else 1.0,
            top_k=(config.top_k or 0) if sample else 0,
            seed=config.seed * 1_000_003 + index if sample else None,
            max_tokens=config.max_new_tokens,
            ignore_eos=True,
            stop_token_ids=[eos_id],
            logprobs=0,
            detokenize=False,
            logit_bias=padding_bias,
        )
        for index in range(len(prompt_ids))
    ]
    return prompts, params


def vllm_generations(
    outputs: Sequence[Any],
    prompt_ids: Sequence[list[int]],
    tokenizer: PreTrainedTokenizerBase,
    eos_id: int,
) -> list[Generation]:
    """`RequestOutput`s (in input order, as `LLM.generate` returns them) to `Generation`s.

    `finished` is vllm's finish_reason "stop" (our EOS, the only stop token); the EOS is cut from the
    ids and its log-probability becomes `eos_logprob`. "length" is a response cut at max_new_tokens.
    """
    if len(outputs) != len(prompt_ids):
        raise RuntimeError(f"vllm returned {len(outputs)} outputs for {len(prompt_ids)} prompts")
    generations = []
    for index, (output, prompt) in enumerate(zip(outputs, prompt_ids, strict=True)):
        returned_prompt = getattr(output, "prompt_token_ids", None)
        if returned_prompt is not None and list(returned_prompt) != list(prompt):
            raise RuntimeError(f"vllm output {index} answers another prompt: the outputs are out of order")
        completion = output.outputs[0]
        ids = [int(t) for t in completion.token_ids]
        if completion.logprobs is None or len(completion.logprobs) != len(ids):
            raise RuntimeError(
                f"vllm output {index}: expected one log-probability per generated token (logprobs=0), "
                f"got {None if completion.logprobs is None else len(completion.logprobs)} for {len(ids)}"
            )
        logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs, ids, strict=True)]
        finished = completion.finish_reason == "stop"
        eos_logprob = None
        if finished and ids and ids[-1] == eos_id:
            eos_logprob = logprobs[-1]
            ids, logprobs = ids[:-1], logprobs[:-1]
        generations.append(
            Generation(
                text=tokenizer.decode(ids, skip_special_tokens=True),
                token_ids=ids,
                logprobs=logprobs,
                finished=finished,
                eos_logprob=eos_logprob,
            )
        )
    return generations
