"""core/generation/vllm_backend.py, the optional vllm sampling backend: the error without vllm, and the
adapter around vllm.

vllm is not installed here (it needs a GPU), so these tests check the adapter, not vLLM: the requests
it builds (`SamplingParams` per prompt, the `LLM(...)` arguments) and how it maps vLLM's documented
return types back to `Generation`s, against a small fake `vllm` module put into `sys.modules`. The
fake mimics `vllm.outputs.RequestOutput` / `CompletionOutput` (token_ids with the EOS as last id when
finish_reason is "stop", `logprobs` as a list of dict[token_id -> Logprob(logprob=...)]) and
`LLM.generate` returning outputs in input order. Whether real vLLM behaves like the fake (and samples
like transformers) is not verified here; docs/sampling.md says what is and is not.
"""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from tests.helpers import SMALL_UNTIED, bpe_tokenizer
from warmup_distill_kedro.core.evaluation.evaluate import EvaluateConfig as EvaluateParams
from warmup_distill_kedro.core.generation import config as generation_config
from warmup_distill_kedro.core.generation import vllm_backend
from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.generation.sampling import generate, generate_from_ids
from warmup_distill_kedro.core.generation.vllm_backend import release_vllm_engine, verify_weights_match_folder
from warmup_distill_kedro.core.models.modeling import (
    Checkpoint,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from warmup_distill_kedro.core.models.tokenization import (
    eos_and_pad_ids,
)
from warmup_distill_kedro.core.warmup.probe import ProbeConfig as ProbeParams

torch.set_num_threads(1)

CORPUS = ["Question: what is 12 plus 345?\nAnswer: 357 #### 357", "The cat sat on the mat."] * 10
PROMPTS = ["Question: what is 12 plus 345?\nAnswer:", "The cat", "The mat sat", "7"]


# ------------------------------------------------------------------------------------- without vllm
@pytest.fixture
def no_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without vllm, even where it is installed."""
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr(generation_config, "vllm_is_installed", lambda: False)
    monkeypatch.setattr(vllm_backend, "vllm_is_installed", lambda: False)


def test_asking_for_vllm_without_it_fails_at_validation_naming_the_parameter(no_vllm):
    with pytest.raises(ValidationError, match=r"backend[\s\S]*pip install '\.\[vllm\]'"):
        SamplingConfig(backend="vllm")
    with pytest.raises(ValidationError, match=r"backend[\s\S]*pip install '\.\[vllm\]'"):
        ProbeParams(backend="vllm")
    with pytest.raises(ValidationError, match=r"sampling\.backend[\s\S]*pip install '\.\[vllm\]'"):
        EvaluateParams(sampling={"backend": "vllm"})
    assert SamplingConfig().backend == "transformers"
    assert ProbeParams().sampling().backend == "transformers"


def test_generate_without_vllm_fails_before_any_work(no_vllm):
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"work started: {name}")

        def __call__(self, *args, **kwargs):
            raise AssertionError("work started: tokenizing")

    config = SamplingConfig().model_copy(update={"backend": "vllm"})  # as if validated elsewhere
    with pytest.raises(ImportError, match=r"probe: sampling backend 'vllm' \(parameter backend: vllm\)"):
        generate(Untouchable(), Untouchable(), ["a prompt"], config, desc="probe")
    with pytest.raises(ImportError, match=r"pip install '\.\[vllm\]'"):
        generate_from_ids(Untouchable(), Untouchable(), [[1, 2]], config)


# ------------------------------------------------------------------------------------------ a fake vllm
@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:  # vllm.outputs.RequestOutput (the fields the adapter reads)
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool = True


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


@dataclass
class Script:
    """What the fake engine "generates" for each prompt, keyed by the prompt's ids."""

    eos_id: int
    plans: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    built: list[dict[str, Any]] = field(default_factory=list)
    calls: list[tuple[list[Any], list[Any]]] = field(default_factory=list)
    reverse_outputs: bool = False
    # Instead of the plans: a model giving these logits (one per embedding row) at every step, decoded
    # greedily after adding each request's logit_bias, as vllm's logit-bias processor does.
    raw_logits: list[float] | None = None


def make_fake_vllm(script: Script) -> types.ModuleType:
    module = types.ModuleType("vllm")

    class LLM:
        def __init__(self, **kwargs: Any) -> None:
            script.built.append(kwargs)

        def generate(self, prompts, sampling_params=None, use_tqdm=True):
            script.calls.append((prompts, sampling_params))
            outputs = [None] * len(prompts)
            # vLLM schedules requests in its own order and returns them in input order.
            for index in sorted(range(len(prompts)), key=lambda i: len(prompts[i]["prompt_token_ids"])):
                ids = prompts[index]["prompt_token_ids"]
                params = sampling_params[index]
                plan = script.plans[tuple(ids)] if script.raw_logits is None else _greedy(script, params)
                plan = plan[: params.max_tokens]
                reason = "stop" if script.eos_id in plan else "length"
                if reason == "stop":
                    plan = plan[: plan.index(script.eos_id) + 1]  # the EOS is the last id returned
                logprobs = []
                for step, token in enumerate(plan):
                    entry = {token: Logprob(logprob=-0.25 * (step + 1) - 0.01 * index, rank=2)}
                    entry[(token + 1) % 50] = Logprob(logprob=-0.01, rank=1)  # a likelier token, not chosen
                    logprobs.append(entry)
                completion = CompletionOutput(
                    0, "", list(plan), None, logprobs, reason, script.eos_id if reason == "stop" else None
                )
                outputs[index] = RequestOutput(str(index), None, list(ids), None, [completion])
            return outputs[::-1] if script.reverse_outputs else outputs

    module.LLM = LLM
    module.SamplingParams = FakeSamplingParams
    return module


def _greedy(script: Script, params: FakeSamplingParams) -> list[int]:
    """The ids greedy decoding picks from `script.raw_logits` plus the request's logit bias."""
    logits = torch.tensor(script.raw_logits, dtype=torch.float32)
    for row, bias in (params.logit_bias or {}).items():
        logits[row] += bias
    token = int(logits.argmax())
    return [token] * params.max_tokens


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory):
    tokenizer = bpe_tokenizer(CORPUS)
    folder = tmp_path_factory.mktemp("ckpt") / "student"
    save_checkpoint(Checkpoint(build_model(SMALL_UNTIED, tokenizer, seed=0), tokenizer), folder)
    return folder


@pytest.fixture
def checkpoint(checkpoint_folder) -> Checkpoint:
    return load_checkpoint(checkpoint_folder)


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch, checkpoint: Checkpoint):
    eos_id, _ = eos_and_pad_ids(checkpoint.tokenizer)
    tok = checkpoint.tokenizer
    script = Script(eos_id=eos_id)
    words = [tok(w, add_special_tokens=False)["input_ids"] for w in (" 357", " sat", " on the", " mat")]
    # prompt 0 ends with EOS after 3 ids, 1 runs past max_new_tokens, 2 emits EOS at once, 3 ends on the
    # last allowed token (EOS as id number max_new_tokens).
    plans = [words[0] + [eos_id], words[1] + words[2] + words[3] * 4, [eos_id], (words[3] * 8)[:4] + [eos_id]]
    for prompt, plan in zip(PROMPTS, plans, strict=True):
        script.plans[tuple(tok(prompt, add_special_tokens=False)["input_ids"])] = plan
    monkeypatch.setitem(sys.modules, "vllm", make_fake_vllm(script))
    release_vllm_engine()
    yield script
    release_vllm_engine()


def _vllm(**overrides: Any) -> SamplingConfig:
    return SamplingConfig(**{"max_new_tokens": 5, "show_progress": False, "backend": "vllm", **overrides})


def test_requests_greedy_and_sampled(fake_vllm, checkpoint, checkpoint_folder):
    tok = checkpoint.tokenizer
    generate(checkpoint.model, tok, PROMPTS, _vllm())
    generate(
        checkpoint.model, tok, PROMPTS, _vllm(do_sample=True, temperature=0.7, top_p=0.9, top_k=5, seed=2)
    )
    (greedy_prompts, greedy), (sampled_prompts, sampled) = fake_vllm.calls
    expected_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert [p["prompt_token_ids"] for p in greedy_prompts] == expected_ids  # ids in, in input order
    assert sampled_prompts == greedy_prompts
    for params in greedy:
        assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.0, 1.0, 0, None)
    for index, params in enumerate(sampled):
        assert (params.temperature, params.top_p, params.top_k) == (0.7, 0.9, 5)
        assert params.seed == 2 * 1_000_003 + index  # one seed per prompt: independent of vllm's batching
    for params in greedy + sampled:
        assert params.n == 1 and params.max_tokens == 5
        assert params.ignore_eos is True and params.stop_token_ids == [fake_vllm.eos_id]  # only our EOS
        assert params.logprobs == 0  # the sampled token's log-probability only
        assert params.detokenize is False
        assert params.logit_bias is None  # the model has no rows past the tokenizer
    # One engine for both calls, built from the checkpoint folder, raw log-probs, no tokenizer of its own.
    assert len(fake_vllm.built) == 1
    built = fake_vllm.built[0]
    assert built["model"] == str(checkpoint_folder.resolve())
    assert built["logprobs_mode"] == "raw_logprobs"
    assert built["skip_tokenizer_init"] is True
    assert built["dtype"] == "float32" and built["seed"] == 0


def test_outputs_map_to_generations_in_input_order(fake_vllm, checkpoint):
    tok = checkpoint.tokenizer
    eos = fake_vllm.eos_id
    generations = generate(checkpoint.model, tok, PROMPTS, _vllm())
    assert len(generations) == len(PROMPTS)
    for index, (prompt, g) in enumerate(zip(PROMPTS, generations, strict=True)):
        plan = fake_vllm.plans[tuple(tok(prompt, add_special_tokens=False)["input_ids"])][:5]
        ended = eos in plan
        ids = plan[: plan.index(eos)] if ended else plan
        assert g.token_ids == ids, prompt  # EOS excluded
        assert g.text == tok.decode(ids, skip_special_tokens=True)
        # The chosen id's log-probability, not the likelier decoy in the same dict.
        assert g.logprobs == pytest.approx([-0.25 * (s + 1) - 0.01 * index for s in range(len(ids))])
        assert g.finished is ended
        if ended:
            assert g.eos_logprob == pytest.approx(-0.25 * (len(ids) + 1) - 0.01 * index)
        else:
            assert g.eos_logprob is None
    assert [g.finished for g in generations] == [True, False, True, True]
    assert generations[2].token_ids == [] and generations[2].text == ""
    assert len(generations[3].token_ids) == 4  # EOS as the last allowed token still finishes
    # The same through ids, and the prompts reversed give the results reversed.
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert generate_from_ids(checkpoint.model, tok, ids, _vllm()) == generations
    backward = generate(checkpoint.model, tok, PROMPTS[::-1], _vllm())
    assert [g.token_ids for g in backward] == [g.token_ids for g in generations][::-1]


def test_outputs_out_of_order_are_refused(fake_vllm, checkpoint):
    fake_vllm.reverse_outputs = True
    with pytest.raises(RuntimeError, match="out of order"):
        generate(checkpoint.model, checkpoint.tokenizer, PROMPTS, _vllm())


def test_engine_is_rebuilt_when_its_arguments_change_and_reserved_ones_are_refused(fake_vllm, checkpoint):
    model, tok = checkpoint.model, checkpoint.tokenizer
    generate(model, tok, PROMPTS, _vllm())
    generate(model, tok, PROMPTS, _vllm(seed=5, do_sample=True))  # sampling seeds are per request
    generate(model, tok, PROMPTS, _vllm(vllm_engine_args={"gpu_memory_utilization": 0.5}))
    assert len(fake_vllm.built) == 2
    assert fake_vllm.built[1]["gpu_memory_utilization"] == 0.5
    with pytest.raises(ValueError, match="logprobs_mode"):
        generate(model, tok, PROMPTS, _vllm(vllm_engine_args={"logprobs_mode": "processed_logprobs"}))


def test_embedding_rows_past_the_tokenizer_are_never_sampled(fake_vllm):
    _, params = vllm_backend.vllm_requests(
        sys.modules["vllm"], [[1, 2]], _vllm(), eos_id=0, n_tokens=10, n_rows=13
    )
    assert params[0].logit_bias == {10: -math.inf, 11: -math.inf, 12: -math.inf}


def test_padding_rows_are_not_sampled_even_where_the_model_prefers_them(fake_vllm, tmp_path):
    """A checkpoint whose padding rows were never trained down may give one of them the highest logit, by
    more than any finite bias lowers it: the bias makes them impossible."""
    tokenizer = bpe_tokenizer(CORPUS)
    model = build_model(SMALL_UNTIED, tokenizer, seed=0)
    model.resize_token_embeddings(len(tokenizer) + 3)  # rows no token uses, as Qwen2.5 has
    save_checkpoint(Checkpoint(model, tokenizer), tmp_path / "padded")
    padded = load_checkpoint(tmp_path / "padded")
    logits = [0.0] * (len(tokenizer) + 3)
    logits[len(tokenizer) + 1] = 500.0  # a padding row, far above every token
    logits[7] = 1.0  # the best real token
    fake_vllm.raw_logits = logits
    [generation] = generate(padded.model, padded.tokenizer, ["The cat"], _vllm(max_new_tokens=3))
    assert generation.token_ids == [7, 7, 7]


def test_a_model_vllm_cannot_load_is_refused(fake_vllm, checkpoint):
    tok = checkpoint.tokenizer
    in_memory = build_model(SMALL_UNTIED, tok, seed=0)  # never saved: no folder to load
    with pytest.raises(ValueError, match="not loaded from one"):
        generate(in_memory, tok, PROMPTS, _vllm())
    # Trained (changed) since it was loaded: vllm would sample from the stale folder.
    assert verify_weights_match_folder(checkpoint.model, vllm_backend.checkpoint_folder(checkpoint.model)) > 0
    with torch.no_grad():
        checkpoint.model.model.norm.weight.add_(0.01)
    with pytest.raises(ValueError, match="differs from them"):
        generate(checkpoint.model, tok, PROMPTS, _vllm())
    assert fake_vllm.built == []


def test_vllm_under_several_processes_is_refused(fake_vllm, checkpoint, monkeypatch):
    monkeypatch.setattr(vllm_backend, "process_rank_and_count", lambda: (0, 2))
    with pytest.raises(ValueError, match="runs in one process"):
        generate(checkpoint.model, checkpoint.tokenizer, PROMPTS, _vllm())
