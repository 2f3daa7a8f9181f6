"""What distillation moved, token by token: a measurement analogue of KDExplainer (arXiv 2105.04181) for
dense causal LMs, which have no routing to read.

Every model of the flow is scored on the same held-out gold responses (the first of those the evaluate
stage uses). One record per gold response token (`token_records`): its position in the response, its
class (`token_class`: digit, operator, end of sequence, formatting, word), the teacher's entropy, whether
the teacher's and the model's most likely tokens are the gold one, the model's NLL, and KL(p || q) from
the teacher p to the model q, split at the teacher's top token k (`kl_top_split`), exactly:

    KL(p || q) = KL(b_p || b_q) + (1 - p_k) KL(p~ || q~)

with b the two-point distributions (mass on k, mass on the rest) and p~, q~ the distributions renormalised
without k. The first term says how much of the divergence is about the token the teacher would pick, the
second how much is about the shape of the rest (the "dark knowledge").

`group_means` averages the records by token class and by position bucket, per task; `changes` takes
after - before of those means for pairs of models (each cell's student against its start, the warmup
student against the vanilla one); `rejected_token_classes` says which classes the check stage rejected in
the corrected set. The KD math follows core/kd/divergences.py: float32 log-softmax at temperature 1,
log-probabilities floored at LOG_FLOOR, prompt and padding masked out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from warmup_distill_kedro.core.evaluation.evaluate import EvaluateConfig
from warmup_distill_kedro.core.evaluation.likelihood import response_scores
from warmup_distill_kedro.core.kd.divergences import LOG_FLOOR, per_position
from warmup_distill_kedro.core.models.encoding import encode_examples
from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids, vocabulary_fingerprint

logger = logging.getLogger(__name__)

DIGIT, OPERATOR, EOS, FORMATTING, WORD = "digit", "operator", "eos", "formatting", "word"
TOKEN_CLASSES: tuple[str, ...] = (DIGIT, OPERATOR, EOS, FORMATTING, WORD)
# Characters of arithmetic; a token made of them alone (spaces aside) is an operator. A hyphen in a word
# ("well-known") is one too when the tokenizer splits it off: the class reads the token, not the sentence.
OPERATOR_CHARACTERS = frozenset("+-*/=×÷<>%^")
ALL = "all"  # the task or group of a mean over every task or every token
# Response positions are grouped by powers of two: 0, 1, 2-3, 4-7, ..., 64+.
POSITION_EDGES: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64)
# Response positions whose KL split is computed at once (each holds a few [rows, vocab] float32 copies).
ROWS_PER_CHUNK = 1024

RECORD_COLUMNS = [
    "subject", "variant", "objective", "example_id", "task", "position", "token_id", "token",
    "token_class", "nll", "student_top_is_gold", "teacher_entropy", "teacher_top_is_gold",
    "teacher_top_prob", "kl", "kl_top", "kl_rest",
]  # fmt: skip
# What `group_means` averages, and `changes` differences (a share of tokens for the *_is_gold columns).
MEASURES = [
    "kl", "kl_top", "kl_rest", "nll", "teacher_entropy", "teacher_top_is_gold", "student_top_is_gold",
]  # fmt: skip
GROUP_COLUMNS = ["subject", "variant", "objective", "task", "by", "group"]


class ExplainConfig(BaseModel):
    """How many held-out gold responses each model is explained on (the first of evaluate's)."""

    model_config = ConfigDict(extra="forbid")

    examples: int = Field(
        64, gt=0, description="gold test responses per model, the first of evaluate.heldout_examples"
    )


# -------------------------------------------------------------------------------------- token classes
def token_class(text: str, is_eos: bool = False) -> str:
    """The class of one decoded token: `eos`; `digit` (holds a decimal digit); `word` (holds a letter);
    `operator` (arithmetic symbols only); `formatting` (the rest: whitespace, punctuation, markers such
    as `####`, and byte fragments of a character the token does not complete)."""
    if is_eos:
        return EOS
    stripped = text.strip()
    if any(character.isdigit() for character in stripped):
        return DIGIT
    if any(character.isalpha() for character in stripped):
        return WORD
    if stripped and all(character in OPERATOR_CHARACTERS for character in stripped):
        return OPERATOR
    return FORMATTING


def token_classes(tokenizer: PreTrainedTokenizerBase, ids: Iterable[int]) -> dict[int, tuple[str, str]]:
    """Each distinct id's decoded text and class (the EOS id is `eos` whatever it decodes to)."""
    eos_id, _ = eos_and_pad_ids(tokenizer)
    decoded = {}
    for token_id in dict.fromkeys(int(i) for i in ids):
        text = tokenizer.decode([token_id])
        decoded[token_id] = (text, token_class(text, token_id == eos_id))
    return decoded


def position_bucket(position: int) -> str:
    """The label of a response position's bucket: `0`, `1`, `2-3`, ..., `64+`."""
    index = int(np.searchsorted(POSITION_EDGES, position, side="right")) - 1
    low = POSITION_EDGES[index]
    if index == len(POSITION_EDGES) - 1:
        return f"{low}+"
    high = POSITION_EDGES[index + 1] - 1
    return str(low) if high == low else f"{low}-{high}"


POSITION_BUCKETS: tuple[str, ...] = tuple(position_bucket(edge) for edge in POSITION_EDGES)


# ------------------------------------------------------------------------------------------ the split
def kl_top_split(teacher_logp: Tensor, student_logp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """KL(p || q) per row of log-probabilities [..., V], and its exact split at the teacher's top token k:
    (kl, kl_top = KL(b_p || b_q), kl_rest = (1 - p_k) KL(p~ || q~)), float32 [...] each.

    Computed in log space: the mass of the rest is a logsumexp over the other tokens, not 1 - p_k, so a
    peaked teacher (p_k close to 1) keeps the rest's share to float32 precision; log-probabilities are
    floored at LOG_FLOOR as in core.kd.divergences (a zero probability contributes 0, never NaN).
    kl_top + kl_rest equals kl up to rounding.
    """
    log_p = teacher_logp.float().clamp(min=LOG_FLOOR)
    log_q = student_logp.float().clamp(min=LOG_FLOOR)
    top = log_p.argmax(dim=-1, keepdim=True)
    is_top = torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, top, True)
    log_p_top, log_q_top = log_p.gather(-1, top), log_q.gather(-1, top)
    log_p_rest = _log_mass_without(log_p, is_top)
    log_q_rest = _log_mass_without(log_q, is_top)
    kl_top = log_p_top.exp() * (log_p_top - log_q_top) + log_p_rest.exp() * (log_p_rest - log_q_rest)
    # (1 - p_k) KL(p~ || q~) = sum over i != k of p_i (log p~_i - log q~_i)
    renormalised = (log_p - log_p_rest) - (log_q - log_q_rest)
    kl_rest = (log_p.exp() * renormalised).masked_fill(is_top, 0.0).sum(dim=-1)
    return per_position("fkl", log_q, log_p, {}), kl_top.squeeze(-1), kl_rest


def _log_mass_without(logp: Tensor, excluded: Tensor) -> Tensor:
    return logp.masked_fill(excluded, -torch.inf).logsumexp(dim=-1, keepdim=True).clamp(min=LOG_FLOOR)


# ------------------------------------------------------------------------------------------- records
def token_records(
    model: Checkpoint,
    teacher: Checkpoint,
    test_examples: pd.DataFrame,
    config: ExplainConfig,
    evaluate: EvaluateConfig,
    subject: str,
    variant: str,
    objective: str,
) -> pd.DataFrame:
    """One row per gold response token of the first `config.examples` held-out examples (of the
    `evaluate.heldout_examples` the evaluate stage scores, encoded the same way), columns RECORD_COLUMNS.

    `teacher` may be `model` itself (the teacher explained: KL 0). A model whose tokenizer differs from
    the teacher's has no token-level comparison: its teacher columns and KL are missing (NaN), said in a
    log line.
    """
    gold = test_examples.head(min(config.examples, evaluate.heldout_examples))
    if gold.empty:
        raise ValueError("explain: test_examples has no rows to explain")
    tokenizer = model.tokenizer
    encoded, _ = encode_examples(
        tokenizer, gold, evaluate.max_length, evaluate.prompt_overflow, evaluate.sampling.prompt_format
    )
    shares_vocabulary = vocabulary_fingerprint(teacher.tokenizer) == vocabulary_fingerprint(tokenizer)
    if not shares_vocabulary:
        logger.info(
            "explain %s: its tokenizer differs from the teacher's, so there is no token-level KL; "
            "recording its NLL only (KL and the teacher's columns are missing)",
            subject,
        )
    _, pad_id = eos_and_pad_ids(tokenizer)
    teacher_model = teacher.model if shares_vocabulary else None  # the model itself: one forward pass
    batches = [
        _batch_columns(scores)
        for scores in response_scores(
            model.model,
            teacher_model,
            encoded,
            pad_id,
            evaluate.batch_size,
            len(tokenizer) if shares_vocabulary else None,
        )
    ]
    columns = {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}
    if not len(columns["token_id"]):
        raise ValueError("explain: the examples have no response tokens")
    examples = gold.iloc[columns.pop("example")]
    decoded = token_classes(tokenizer, columns["token_id"])
    records = pd.DataFrame(
        {
            "subject": subject,
            "variant": variant,
            "objective": objective,
            "example_id": examples["example_id"].to_numpy(),
            "task": examples["task"].to_numpy(),
            "token": [decoded[int(i)][0] for i in columns["token_id"]],
            "token_class": [decoded[int(i)][1] for i in columns["token_id"]],
            **columns,
        }
    )
    for column in ("student_top_is_gold", "teacher_top_is_gold"):
        records[column] = records[column].astype("boolean")
    return records[RECORD_COLUMNS]


def _batch_columns(scores: Any) -> dict[str, np.ndarray]:
    student, teacher, targets = scores.student, scores.teacher, scores.targets
    n = len(targets)
    columns = {
        "example": scores.examples.cpu().numpy(),
        "position": scores.positions.cpu().numpy(),
        "token_id": targets.cpu().numpy(),
        "nll": -student.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu().numpy(),
        "student_top_is_gold": (student.argmax(-1) == targets).cpu().numpy().astype(object),
    }
    if teacher is None:
        missing = np.full(n, np.nan, dtype=np.float32)
        return {
            **columns,
            "teacher_entropy": missing,
            "teacher_top_is_gold": np.full(n, pd.NA, dtype=object),
            "teacher_top_prob": missing,
            "kl": missing,
            "kl_top": missing,
            "kl_rest": missing,
        }
    # The split holds several [rows, vocab] temporaries: a bounded number of rows at a time keeps that
    # within a few times one row block, whatever the batch (a 152k vocabulary is 0.6 MB per row).
    chunks = [
        _teacher_columns(teacher[rows], student[rows], targets[rows])
        for rows in torch.arange(n, device=targets.device).split(ROWS_PER_CHUNK)
    ]
    return {**columns, **{key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]}}


def _teacher_columns(teacher: Tensor, student: Tensor, targets: Tensor) -> dict[str, np.ndarray]:
    kl, kl_top, kl_rest = kl_top_split(teacher, student)
    floored = teacher.clamp(min=LOG_FLOOR)
    return {
        "teacher_entropy": -(floored.exp() * floored).sum(-1).cpu().numpy(),
        "teacher_top_is_gold": (teacher.argmax(-1) == targets).cpu().numpy().astype(object),
        "teacher_top_prob": teacher.max(-1).values.exp().cpu().numpy(),
        "kl": kl.cpu().numpy(),
        "kl_top": kl_top.cpu().numpy(),
        "kl_rest": kl_rest.cpu().numpy(),
    }


# ------------------------------------------------------------------------------------------ aggregates
def group_means(records: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Mean of every MEASURES column per subject and task (each task, and `all`), by token class and by
    position bucket (`by` = `class` | `position`, each with a group `all` too), with the number of tokens.
    A measure that is missing for a subject (KL across tokenizers) stays missing (NaN)."""
    frames = []
    for frame in records:
        frame = frame.assign(
            **{c: frame[c].astype("float64") for c in ("student_top_is_gold", "teacher_top_is_gold")},
            position_bucket=frame["position"].map(position_bucket),
        )
        for task, rows in [(ALL, frame), *frame.groupby("task", sort=True)]:
            for by, column, order in (
                ("class", "token_class", TOKEN_CLASSES),
                ("position", "position_bucket", POSITION_BUCKETS),
            ):
                frames.append(_means(rows, task, by, rows[column], order))
                frames.append(_means(rows, task, by, pd.Series(ALL, index=rows.index), (ALL,)))
    if not frames:
        raise ValueError("explain: no token records to average")
    return pd.concat(frames, ignore_index=True)


def _means(rows: pd.DataFrame, task: str, by: str, groups: pd.Series, order: Sequence[str]) -> pd.DataFrame:
    grouped = rows.groupby(groups.rename("group"), sort=False)
    means = grouped[MEASURES].mean().assign(tokens=grouped.size())
    means = means.reindex([g for g in order if g in means.index]).reset_index()
    first = rows.iloc[0]
    return means.assign(
        subject=first["subject"], variant=first["variant"], objective=first["objective"], task=task, by=by
    )[[*GROUP_COLUMNS, "tokens", *MEASURES]]


def changes(table: pd.DataFrame, comparisons: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """after - before of every mean of `table` (group_means) for each (before, after) pair of subjects,
    group by group: `delta_<measure>` columns, the after model's variant and objective, and its tokens
    (both models read the same gold tokens when they share a tokenizer)."""
    indexed = table.set_index(["subject", "task", "by", "group"])
    frames = []
    for before, after in comparisons:
        for name in (before, after):
            if name not in indexed.index.get_level_values("subject"):
                raise ValueError(f"explain: no token records for subject {name!r} (comparing {after})")
        base, moved = indexed.loc[before], indexed.loc[after]
        deltas = moved[MEASURES] - base[MEASURES].reindex(moved.index)
        frames.append(
            deltas.add_prefix("delta_")
            .assign(
                comparison=after,
                baseline=before,
                variant=moved["variant"],
                objective=moved["objective"],
                tokens=moved["tokens"],
            )
            .reset_index()
        )
    columns = ["comparison", "baseline", "variant", "objective", "task", "by", "group", "tokens"]
    if not frames:
        return pd.DataFrame(columns=[*columns, *(f"delta_{m}" for m in MEASURES)])
    result = pd.concat(frames, ignore_index=True)
    return result[[*columns, *(f"delta_{m}" for m in MEASURES)]]


def headline(changed: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    """Per comparison, the change over every task and token: {after: {delta_kl, delta_kl_top,
    delta_kl_rest, delta_nll}} (None where KL is missing)."""
    overall = changed[(changed["task"] == ALL) & (changed["group"] == ALL) & (changed["by"] == "class")]
    keys = ("delta_kl", "delta_kl_top", "delta_kl_rest", "delta_nll")
    return {
        row["comparison"]: {key: None if pd.isna(row[key]) else float(row[key]) for key in keys}
        for _, row in overall.iterrows()
    }


# --------------------------------------------------------------------------- what the check rejected
def rejected_token_classes(corrected_set: pd.DataFrame, tokenizer: PreTrainedTokenizerBase) -> pd.DataFrame:
    """Which classes of tokens the check stage rejected: for each token class, the pairs of the corrected
    set whose first rejected token (at `flag_char` of `rejected`; the end of the text: the EOS) is of that
    class (`rejected`, and `rejected_share` of all pairs), beside the class's share of every token of the
    rejected responses (`token_share`): a class rejected more often than it occurs is what the check aims
    at. Only rows of kind `pair` count (the others were not corrected)."""
    for column in ("kind", "rejected", "flag_char"):
        if column not in corrected_set:
            raise ValueError(f"explain: corrected_set has no column {column!r}; expected the check's output")
    pairs = corrected_set[corrected_set["kind"] == "pair"]
    rejected, tokens = [], []
    for text, flag_char in zip(pairs["rejected"], pairs["flag_char"], strict=True):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        decoded = token_classes(tokenizer, encoding["input_ids"])
        classes = [decoded[i][1] for i in encoding["input_ids"]]
        tokens += classes
        rejected.append(EOS if flag_char >= len(text) else _class_at(encoding, classes, int(flag_char)))
    rejected_counts = pd.Series(rejected, dtype=object).value_counts()
    token_counts = pd.Series(tokens, dtype=object).value_counts()
    return pd.DataFrame(
        {
            "token_class": list(TOKEN_CLASSES),
            "rejected": [int(rejected_counts.get(c, 0)) for c in TOKEN_CLASSES],
            "rejected_share": [rejected_counts.get(c, 0) / max(len(rejected), 1) for c in TOKEN_CLASSES],
            "token_share": [token_counts.get(c, 0) / max(len(tokens), 1) for c in TOKEN_CLASSES],
        }
    )


def _class_at(encoding: Mapping[str, Any], classes: Sequence[str], char: int) -> str:
    """The class of the token whose characters cover `char` (the last one starting at or before it)."""
    starts = [start for start, _ in encoding["offset_mapping"]]
    index = max(int(np.searchsorted(starts, char, side="right")) - 1, 0)
    return classes[index] if classes else FORMATTING
