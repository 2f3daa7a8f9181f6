"""The teacher as checker: score the student's sampled tokens, flag low-probability knowledge, correct it.

Warmup-Distill (arXiv 2502.11766), steps 2 and 3 ("check" and "modify"):

1. Score: one teacher forward pass per rollout gives log p(y_t | x, y_<t) for every sampled token. When
   the teacher has its own tokenizer, the response *text* is re-tokenized by the teacher and every
   teacher token keeps its character span, so a flag can be mapped back to the student's tokens.
2. Flag: a check rule marks the tokens the teacher does not endorse (`teacher_prob`, `margin`, `top_k`).
3. Modify: `continue` keeps the prefix before the first flag, lets the teacher choose that token and
   write the rest; `replace_only` swaps each flagged token for the teacher's argmax.

Everything here works on token ids and text; it never imports Kedro.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.generation.sampling import generate_from_ids
from warmup_distill_kedro.core.models.chat import PromptFormat, end_of_turn_id, render_prompts
from warmup_distill_kedro.core.processes import gather_in_order, is_main_process, process_share

CheckRule = Literal["teacher_prob", "margin", "top_k"]
CHECK_RULES: tuple[str, ...] = ("teacher_prob", "margin", "top_k")


class CheckConfig(BaseModel):
    """Which sampled tokens the teacher rejects, and how the rejected rollouts are corrected."""

    model_config = ConfigDict(extra="forbid")

    rule: CheckRule = "teacher_prob"
    tau: float = Field(
        0.1, description="teacher_prob: flag p < tau, 0 < tau < 1; margin: flag log q - log p > tau, tau >= 0"
    )
    top_k: int = Field(5, ge=1, description="top_k rule: flag tokens outside the teacher's k most likely")
    strategy: Literal["continue", "replace_only"] = "continue"
    choose: Literal["argmax", "sample"] = Field(
        "argmax", description="continue: how the teacher picks the flagged token and the rest"
    )
    continuation: SamplingConfig = SamplingConfig(max_new_tokens=64)
    batch_size: int = Field(32, gt=0, description="sequences per teacher scoring pass")
    keep_unflagged: bool = Field(
        False, description="keep rollouts the rule did not flag as SFT rows (chosen only) in corrected_set"
    )
    show_progress: bool = True

    @model_validator(mode="after")
    def _tau_in_range(self) -> CheckConfig:
        if self.rule == "teacher_prob" and not 0.0 < self.tau < 1.0:
            raise ValueError(f"tau must be in (0, 1) for rule 'teacher_prob' (a probability), got {self.tau}")
        if self.rule == "margin" and self.tau < 0.0:
            raise ValueError(f"tau must be >= 0 for rule 'margin' (a log-probability gap), got {self.tau}")
        return self


@dataclass(frozen=True)
class ScoredResponse:
    """The teacher's view of one response, in the teacher's tokenization."""

    token_ids: list[int]  # response tokens as the teacher reads them (EOS last when the response finished)
    char_starts: list[int]  # where each token starts in the response text (len(text) for EOS)
    logprobs: np.ndarray  # float32: log p(token | prompt, previous tokens)
    argmax: np.ndarray  # the teacher's most likely token at each position
    in_top_k: np.ndarray  # bool: the token is among the teacher's top_k at its position


# ----------------------------------------------------------------------------------------------- offsets
def token_char_starts(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int]) -> list[int]:
    """Character offset in `decode(token_ids)` where each token starts.

    Measured by decoding prefixes, so it holds for the exact ids a model sampled, canonical or not. A
    token that is only part of a multi-byte character starts where that character does.
    """
    starts, previous = [], 0
    for i in range(len(token_ids)):
        starts.append(previous)
        previous = max(previous, len(tokenizer.decode(list(token_ids[: i + 1]), skip_special_tokens=True)))
    return starts


def retokenize_response(
    tokenizer: PreTrainedTokenizerBase, text: str, finished: bool, prompt_format: PromptFormat = "plain"
) -> tuple[list[int], list[int]]:
    """A response text in another tokenizer: ids and character starts (plus EOS, or the chat template's
    end-of-turn token, when it finished)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    starts = [start for start, _ in encoded["offset_mapping"]]
    if finished:
        ids.append(end_of_turn_id(tokenizer, prompt_format))
        starts.append(len(text))
    return ids, starts


def token_at_char(char_starts: Sequence[int], char: int) -> int:
    """Index of the token whose span contains `char` (the last token starting at or before it)."""
    index = int(np.searchsorted(np.asarray(char_starts), char, side="right")) - 1
    return max(index, 0)


def align_logprobs(
    source_starts: Sequence[int], source_logprobs: Sequence[float], target_starts: Sequence[int]
) -> np.ndarray:
    """Sum the source tokens' log-probs onto the target token whose span they start in.

    Exact where both tokenizations cut the text at the same places (the chain rule over the same span);
    an approximation where a source token straddles a target boundary.
    """
    aligned = np.zeros(len(target_starts), dtype=np.float32)
    for start, logprob in zip(source_starts, source_logprobs, strict=True):
        aligned[token_at_char(target_starts, start)] += logprob
    return aligned


# ------------------------------------------------------------------------------------------------ scoring
@torch.no_grad()
def score_responses(
    model: PreTrainedModel,
    prompt_ids: Sequence[list[int]],
    response_ids: Sequence[list[int]],
    batch_size: int,
    top_k: int = 1,
    desc: str = "score",
    show_progress: bool = True,
    vocab_size: int | None = None,
    across_processes: bool = False,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(log-probs, argmax ids, in-top-k) of every response token, in batched teacher forward passes.

    `vocab_size` (the tokenizer's size) drops embedding rows that name no token (Qwen2.5's padding).

    `across_processes=True` (a collective: every process calls it with the same arguments) splits the
    batches round-robin across processes when torch.distributed is initialized with world size > 1 and
    gathers the scores, in order, on every process. Scoring draws nothing at random and a batch keeps
    its composition, so the scores equal one process's (bit for bit on CPU; the test checks it).

    Only the response rows of the logits go through a float32 log-softmax, one sequence at a time, so a
    152k vocabulary never needs a [batch, length, vocab] float32 tensor.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompt_ids)), key=lambda i: -(len(prompt_ids[i]) + len(response_ids[i])))
    results: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = [None] * len(order)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mine = process_share(len(batches), across_processes)
    for batch_index in tqdm(mine, desc=desc, disable=not (show_progress and is_main_process())):
        rows = batches[batch_index]
        sequences = [list(prompt_ids[i]) + list(response_ids[i]) for i in rows]
        width = max(len(s) for s in sequences)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, sequence in enumerate(sequences):
            input_ids[r, : len(sequence)] = torch.tensor(sequence)
            attention_mask[r, : len(sequence)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for r, i in enumerate(rows):
            start, n = len(prompt_ids[i]), len(response_ids[i])
            # Position t of the logits predicts token t + 1.
            logprobs = logits[r, start - 1 : start - 1 + n, :vocab_size].float().log_softmax(-1)
            targets = torch.tensor(response_ids[i], device=device, dtype=torch.long)
            chosen = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1).indices
            results[i] = (
                chosen.cpu().numpy().astype(np.float32),
                top[:, 0].cpu().numpy(),
                (top == targets.unsqueeze(-1)).any(-1).cpu().numpy(),
            )
    model.train(was_training)
    return gather_in_order(results, across_processes)


def flag_tokens(
    scored: ScoredResponse, student_logprobs: np.ndarray | None, config: CheckConfig
) -> np.ndarray:
    """Boolean mask of the tokens the check rule rejects (`student_logprobs` aligned to `scored`)."""
    if config.rule == "teacher_prob":
        return np.exp(scored.logprobs) < config.tau
    if config.rule == "margin":
        if student_logprobs is None:
            raise ValueError("check rule 'margin' needs the student's log-probabilities of the rollout")
        return (student_logprobs - scored.logprobs) > config.tau
    return ~scored.in_top_k


# ---------------------------------------------------------------------------------------------- modifying
@dataclass(frozen=True)
class Correction:
    """A corrected response: its text, and whether it ended with an end-of-sequence token (False: cut at
    the continuation's max_new_tokens)."""

    text: str
    finished: bool


def continue_from_flags(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    scored: Sequence[ScoredResponse],
    first_flags: Sequence[int],
    config: CheckConfig,
    across_processes: bool = False,
    prompt_format: PromptFormat = "plain",
) -> list[Correction]:
    """`continue`: keep the tokens before the first flag; the teacher picks that token and writes the rest
    (up to EOS, or with `prompt_format` chat its end-of-turn token).

    `across_processes`: as in `generate_from_ids` (with several processes, `choose: sample` draws what
    one process draws only up to the device's determinism; greedy continuations are seed-free).
    """
    sampling = config.continuation.model_copy(
        update={"do_sample": config.choose == "sample", "prompt_format": prompt_format}
    )
    contexts = [
        list(p) + s.token_ids[:flag] for p, s, flag in zip(prompt_ids, scored, first_flags, strict=True)
    ]
    generations = generate_from_ids(
        model, tokenizer, contexts, sampling, desc="teacher continues", across_processes=across_processes
    )
    return [
        Correction(tokenizer.decode(s.token_ids[:flag] + g.token_ids, skip_special_tokens=True), g.finished)
        for s, flag, g in zip(scored, first_flags, generations, strict=True)
    ]


def replace_flagged(
    tokenizer: PreTrainedTokenizerBase,
    scored: ScoredResponse,
    flags: np.ndarray,
    prompt_format: PromptFormat = "plain",
) -> Correction:
    """`replace_only`: every flagged token becomes the teacher's argmax; the response ends at the first EOS
    or end-of-turn token (finished), or where the scored tokens end (not finished: none was kept)."""
    eos_id = end_of_turn_id(tokenizer, prompt_format)
    ids = [int(a) if f else t for t, a, f in zip(scored.token_ids, scored.argmax, flags, strict=True)]
    finished = eos_id in ids
    if finished:
        ids = ids[: ids.index(eos_id)]
    return Correction(tokenizer.decode(ids, skip_special_tokens=True), finished)


# ------------------------------------------------------------------------------------------ whole rollouts
@dataclass(frozen=True)
class Rollout:
    """One student sample, as the probe stored it."""

    prompt: str
    response: str
    token_ids: list[int]  # the student's sampled ids, EOS excluded
    char_starts: list[int]  # where each sampled token starts in `response`
    logprobs: list[float]  # the student's log-probability of each sampled id
    finished: bool
    eos_logprob: float | None = None


@dataclass(frozen=True)
class CheckedRollout:
    scored: ScoredResponse
    student_logprobs: np.ndarray  # the student's log-probs summed onto the teacher's tokens
    flags: np.ndarray  # bool per teacher token

    @property
    def first_flag(self) -> int:
        """Teacher token index of the first flag, -1 when nothing fired."""
        hits = np.flatnonzero(self.flags)
        return int(hits[0]) if hits.size else -1


def check_rollouts(
    teacher: PreTrainedModel,
    teacher_tokenizer: PreTrainedTokenizerBase,
    rollouts: Sequence[Rollout],
    same_vocabulary: bool,
    config: CheckConfig,
    show_progress: bool = True,
    across_processes: bool = False,
    prompt_format: PromptFormat = "plain",
) -> list[CheckedRollout]:
    """Score every rollout with the teacher and apply the check rule.

    With one vocabulary the teacher scores exactly the ids the student sampled. Otherwise the text is
    re-tokenized by the teacher and the student's log-probs are summed onto the teacher's tokens.
    `across_processes`: the teacher's scoring passes are shared out, as in `score_responses`.
    `prompt_format` chat: the teacher reads each prompt in its own chat template, and a finished response
    ends with its end-of-turn token.
    """
    eos_id = end_of_turn_id(teacher_tokenizer, prompt_format)
    rendered = render_prompts(teacher_tokenizer, [r.prompt for r in rollouts], prompt_format, "prompt_format")
    prompt_ids, views, student_views = [], [], []
    for rollout, prompt in zip(rollouts, rendered, strict=True):
        prompt_ids.append(teacher_tokenizer(prompt, add_special_tokens=False)["input_ids"])
        student_ids = list(rollout.token_ids)
        student_starts = list(rollout.char_starts)
        student_logprobs = list(rollout.logprobs)
        if rollout.finished:  # whether to stop is a decision the teacher checks too
            student_starts.append(len(rollout.response))
            student_logprobs.append(rollout.eos_logprob if rollout.eos_logprob is not None else 0.0)
            student_ids.append(eos_id)
        if same_vocabulary:
            views.append((student_ids, student_starts))
            student_views.append(np.asarray(student_logprobs, dtype=np.float32))
        else:
            ids, starts = retokenize_response(
                teacher_tokenizer, rollout.response, rollout.finished, prompt_format
            )
            views.append((ids, starts))
            student_views.append(align_logprobs(student_starts, student_logprobs, starts))
    top_k = config.top_k if config.rule == "top_k" else 1
    scores = score_responses(
        teacher,
        prompt_ids,
        [ids for ids, _ in views],
        config.batch_size,
        top_k,
        "teacher checks",
        show_progress,
        # Embedding rows past the tokenizer (Qwen2.5's padding) name no token: keep them out of the softmax.
        vocab_size=len(teacher_tokenizer),
        across_processes=across_processes,
    )
    checked = []
    for (ids, starts), (logprobs, argmax, in_top_k), student in zip(
        views, scores, student_views, strict=True
    ):
        scored = ScoredResponse(ids, starts, logprobs, argmax, in_top_k)
        checked.append(CheckedRollout(scored, student, flag_tokens(scored, student, config)))
    return checked


def correct_rollouts(
    teacher: PreTrainedModel,
    teacher_tokenizer: PreTrainedTokenizerBase,
    rollouts: Sequence[Rollout],
    checked: Sequence[CheckedRollout],
    config: CheckConfig,
    across_processes: bool = False,
    prompt_format: PromptFormat = "plain",
) -> list[Correction | None]:
    """The correction of every flagged rollout (None where nothing fired), the teacher reading each prompt
    in `prompt_format` (as in `check_rollouts`).

    `across_processes`: the teacher's continuations are shared out, as in `generate_from_ids`.
    """
    flagged = [i for i, c in enumerate(checked) if c.first_flag >= 0]
    corrected: list[Correction | None] = [None] * len(checked)
    if not flagged:
        return corrected
    if config.strategy == "replace_only":
        for i in flagged:
            corrected[i] = replace_flagged(
                teacher_tokenizer, checked[i].scored, checked[i].flags, prompt_format
            )
        return corrected
    prompts = render_prompts(
        teacher_tokenizer, [rollouts[i].prompt for i in flagged], prompt_format, "prompt_format"
    )
    prompt_ids = [teacher_tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    corrections = continue_from_flags(
        teacher,
        teacher_tokenizer,
        prompt_ids,
        [checked[i].scored for i in flagged],
        [checked[i].first_flag for i in flagged],
        config,
        across_processes=across_processes,
        prompt_format=prompt_format,
    )
    for i, correction in zip(flagged, corrections, strict=True):
        corrected[i] = correction
    return corrected
