"""The check stage's tables: the probe's rollouts scored by the teacher, and the corrected set.

`score_rollouts` adds the teacher's view of every sampled token and the check rule's verdict to each
rollout; `build_corrected_set` lets the teacher correct the flagged ones (check.py) and returns the
(prompt, chosen = corrected, rejected = original) pairs the warmup trains on, with the check's statistics.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from warmup_distill_kedro.core.models.chat import (
    PromptFormat,
    end_of_turn_id,
    render_prompts,
    require_chat_template,
    table_prompt_format,
)
from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.core.models.tokenization import vocabulary_fingerprint
from warmup_distill_kedro.core.tasks import math_exact_match
from warmup_distill_kedro.core.warmup.check import (
    CheckConfig,
    CheckedRollout,
    Rollout,
    ScoredResponse,
    check_rollouts,
    correct_rollouts,
    score_responses,
    token_at_char,
)

logger = logging.getLogger(__name__)


CORRECTED_SET_COLUMNS = [
    "prompt_id", "task", "prompt", "answer", "sample_index", "chosen", "rejected", "chosen_finished",
    "rejected_finished", "kind",
    "flag_char", "flag_token", "flag_teacher_token", "n_flagged", "n_tokens",
    "teacher_mean_logp_chosen", "teacher_mean_logp_rejected", "prompt_format",
]  # fmt: skip


def score_rollouts(rollouts: pd.DataFrame, teacher: Checkpoint, config: CheckConfig) -> pd.DataFrame:
    """The teacher's log-probability of every sampled token and the rule's verdict, one row per rollout.

    Under several processes every process scores a share of the batches and returns the whole table.
    """
    if rollouts.empty:
        raise ValueError("check: the rollouts table is empty; run the probe pipeline first")
    same_vocabulary = set(rollouts["vocabulary"]) == {vocabulary_fingerprint(teacher.tokenizer)}
    if not same_vocabulary:
        logger.info("check: the teacher has its own tokenizer; responses are re-tokenized, aligned by text")
    prompt_format = table_prompt_format(rollouts)
    if prompt_format == "chat":  # the teacher reads the prompts in its own template: it needs one
        require_chat_template(teacher.tokenizer, "probe.prompt_format (the rollouts' format)")
    checked = check_rollouts(
        teacher.model,
        teacher.tokenizer,
        _rollouts(rollouts),
        same_vocabulary,
        config,
        config.show_progress,
        across_processes=True,
        prompt_format=prompt_format,
    )
    return rollouts.assign(
        teacher_token_ids=[c.scored.token_ids for c in checked],
        teacher_char_starts=[c.scored.char_starts for c in checked],
        teacher_logprobs=[c.scored.logprobs.tolist() for c in checked],
        teacher_argmax=[c.scored.argmax.tolist() for c in checked],
        teacher_in_top_k=[c.scored.in_top_k.tolist() for c in checked],
        student_logprobs_aligned=[c.student_logprobs.tolist() for c in checked],
        flags=[c.flags.tolist() for c in checked],
        n_flagged=[int(c.flags.sum()) for c in checked],
        first_flag=[c.first_flag for c in checked],
    )


def build_corrected_set(
    scored_rollouts: pd.DataFrame, teacher: Checkpoint, config: CheckConfig
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(prompt, chosen = corrected, rejected = original) pairs, and the check's statistics.

    `kind` says what a row is: `pair` (flagged and corrected: the warmup data), or with
    `keep_unflagged`, `sft` (nothing fired: the student's own response, chosen only). Flagged rollouts
    whose correction came out identical to the original (text and ending) are counted, not kept.
    `chosen_finished` / `rejected_finished`: whether each side ended with an end-of-sequence token (the
    original, as the probe sampled it; the correction, as the teacher wrote it), False where it was cut
    at a token budget: the warmup gives an EOS only to the sides that ended.
    """
    table = scored_rollouts.reset_index(drop=True)
    prompt_format = table_prompt_format(table)
    checked = _checked(table)
    corrected = correct_rollouts(
        teacher.model,
        teacher.tokenizer,
        _rollouts(table),
        checked,
        config,
        across_processes=True,
        prompt_format=prompt_format,
    )
    flag_chars = [c.scored.char_starts[c.first_flag] if c.first_flag >= 0 else -1 for c in checked]
    rows = table.assign(
        chosen=[None if c is None else c.text for c in corrected],
        chosen_finished=[None if c is None else c.finished for c in corrected],
        rejected=table["response"],
        rejected_finished=table["finished"].astype(bool),
        flag_char=flag_chars,
        flag_token=[
            _student_token(row, char) for row, char in zip(table.itertuples(), flag_chars, strict=True)
        ],
        flag_teacher_token=table["first_flag"],
        teacher_mean_logp_rejected=[float(np.mean(c.scored.logprobs)) for c in checked],
        prompt_format=prompt_format,
    )
    flagged = rows["first_flag"] >= 0
    changed = flagged & (
        (rows["chosen"] != rows["rejected"]) | (rows["chosen_finished"] != rows["rejected_finished"])
    )
    rows["kind"] = np.where(changed, "pair", np.where(flagged, "unchanged", "unflagged"))
    pairs = rows[rows["kind"] == "pair"].copy()
    pairs["teacher_mean_logp_chosen"] = _teacher_mean_logprobs(teacher, pairs, config, prompt_format)
    kept = [pairs]
    if config.keep_unflagged:
        sft = rows[rows["kind"] == "unflagged"]
        kept.append(sft.assign(kind="sft", chosen=sft["response"], chosen_finished=sft["rejected_finished"],
                               rejected=None, rejected_finished=None,
                               teacher_mean_logp_chosen=sft["teacher_mean_logp_rejected"]))  # fmt: skip
    corrected_set = pd.concat(kept, ignore_index=True)[CORRECTED_SET_COLUMNS]
    summary = _summary(rows, pairs, config)
    logger.info(
        "check: %.1f%% of sampled tokens flagged (%s), %d of %d rollouts corrected, first flag at token %.1f",
        100 * summary["share_tokens_flagged"],
        config.rule,
        summary["n_pairs"],
        summary["n_rollouts"],
        summary["mean_first_flag_token"],
    )
    return corrected_set, summary


# ------------------------------------------------------------------------------------------------ helpers
def _rollouts(table: pd.DataFrame) -> list[Rollout]:
    return [
        Rollout(
            prompt=row.prompt,
            response=row.response,
            token_ids=list(row.token_ids),
            char_starts=list(row.char_starts),
            logprobs=list(row.logprobs),
            finished=bool(row.finished),
            eos_logprob=None if pd.isna(row.eos_logprob) else float(row.eos_logprob),
        )
        for row in table.itertuples(index=False)
    ]


def _checked(table: pd.DataFrame) -> list[CheckedRollout]:
    """The check results as `score_rollouts` stored them (parquet lists back to arrays)."""
    return [
        CheckedRollout(
            ScoredResponse(
                list(row.teacher_token_ids),
                list(row.teacher_char_starts),
                np.asarray(row.teacher_logprobs, dtype=np.float32),
                np.asarray(row.teacher_argmax),
                np.asarray(row.teacher_in_top_k, dtype=bool),
            ),
            np.asarray(row.student_logprobs_aligned, dtype=np.float32),
            np.asarray(row.flags, dtype=bool),
        )
        for row in table.itertuples(index=False)
    ]


def _student_token(row: Any, char: int) -> int:
    """The student's token index at a flagged character; n_tokens when the flag is the EOS."""
    if char < 0:
        return -1
    if char >= len(row.response) or len(row.char_starts) == 0:
        return int(row.n_tokens)
    return token_at_char(list(row.char_starts), char)


def _teacher_mean_logprobs(
    teacher: Checkpoint, pairs: pd.DataFrame, config: CheckConfig, prompt_format: PromptFormat
) -> list[float]:
    """The teacher's mean per-token log-probability of each corrected response (its EOS, or end-of-turn
    token, included where it ended)."""
    if pairs.empty:
        return []
    tokenizer = teacher.tokenizer
    eos_id = end_of_turn_id(tokenizer, prompt_format)
    prompts = render_prompts(tokenizer, pairs["prompt"].tolist(), prompt_format, "prompt_format")
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    response_ids = [
        tokenizer(c, add_special_tokens=False)["input_ids"] + ([eos_id] if finished else [])
        for c, finished in zip(pairs["chosen"], pairs["chosen_finished"], strict=True)
    ]
    scores = score_responses(
        teacher.model, prompt_ids, response_ids, config.batch_size, desc="teacher scores corrections",
        show_progress=config.show_progress, vocab_size=len(tokenizer), across_processes=True,
    )  # fmt: skip
    return [float(np.mean(logprobs)) if len(logprobs) else float("nan") for logprobs, _, _ in scores]


def _mean(values: pd.Series) -> float:
    return float(values.mean()) if len(values) else float("nan")


def _summary(rows: pd.DataFrame, pairs: pd.DataFrame, config: CheckConfig) -> dict[str, Any]:
    n_tokens = int(rows["flags"].map(len).sum())
    flagged = rows[rows["first_flag"] >= 0]
    summary: dict[str, Any] = {
        "rule": config.rule,
        "tau": config.tau,
        "strategy": config.strategy,
        "n_rollouts": len(rows),
        "n_scored_tokens": n_tokens,
        "share_tokens_flagged": float(rows["n_flagged"].sum() / max(n_tokens, 1)),
        "share_rollouts_flagged": len(flagged) / len(rows),
        "share_rollouts_corrected": len(pairs) / len(rows),
        "n_pairs": len(pairs),
        "n_flagged_unchanged": int((rows["kind"] == "unchanged").sum()),
        "n_unflagged": int((rows["kind"] == "unflagged").sum()),  # with the two above: every rollout
        "mean_first_flag_token": _mean(flagged["first_flag"]),
        "mean_first_flag_fraction": _mean(flagged["first_flag"] / flagged["flags"].map(len)),
        "teacher_mean_logp_rejected": _mean(pairs["teacher_mean_logp_rejected"]),
        "teacher_mean_logp_chosen": _mean(pairs["teacher_mean_logp_chosen"]),
    }
    math = pairs[pairs["task"] == "math"]
    for side in ("rejected", "chosen"):  # how often the correction turns a wrong answer right, and back
        correct = [
            math_exact_match(text, answer) for text, answer in zip(math[side], math["answer"], strict=True)
        ]
        summary[f"math_{side}_correct"] = float(np.mean(correct)) if correct else float("nan")
    return summary
