"""The teacher's logits, computed once: its top-k next-token log-probabilities at every response position
of the KD examples, which every token-level cell of a grid reads instead of running the teacher again.

At a response position, with p the teacher's distribution at the KD temperature T, the cache keeps the k
most likely token ids, their log p, and the log of the mass left outside them, log(1 - sum_topk p) (the
tail). KD from the cache compares (k + 1)-point distributions: the teacher's k probabilities plus its tail,
against the student's probabilities of the same k ids plus its own tail mass (everything else it puts
elsewhere), with the objective's per-position formula (divergences.per_position); the student's gradient
reaches every logit through the tail. With k equal to the vocabulary the tail is empty and the loss is the
full-vocabulary one.

Temperature: the values are log p at the temperature in use when the cache was built (one number per
token cannot give the tail at another T), and a cell at another temperature is refused. Storage per
response token: k int32 ids, k float16 log-probabilities (float32 with `values: float32`) and one float32
tail, 6k + 4 bytes (196 at k 32; 8k + 4 in float32).

A cache is only read for what it was made from: its metadata names the teacher (catalog version and a
digest of its weights), a digest of the encoded examples (the exact ids a cell trains on), k, the
temperature and the vocabulary, and `check_cache` refuses any mismatch, saying how to rebuild.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from warmup_distill_kedro.core.kd.divergences import LOG_FLOOR, per_position
from warmup_distill_kedro.core.kd.losses import KDConfig, distillation_metrics, response_positions
from warmup_distill_kedro.core.models.chat import table_prompt_format
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX, EncodedExample, collate, encode_examples
from warmup_distill_kedro.core.models.modeling import Checkpoint, weights_digest
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids, vocabulary_fingerprint

CACHE_FORMAT = 1
REBUILD = "rebuild it: kedro run --pipeline=distill --nodes=cache_teacher_logits"

# Batch keys of the cached rows, aligned with the batch's positions (position t predicts token t + 1).
TOPK_IDS, TOPK_LOGPROBS, TAIL_LOGPROB = "teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob"


class TeacherCacheConfig(BaseModel):
    """`distill.teacher_cache`: whether the token-level cells read the teacher from a cache built once."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        False, description="build teacher_topk once; token-level cells on fixed text read it"
    )
    top_k: int = Field(32, gt=0, description="ids kept per position (the rest is one tail bucket)")
    values: Literal["float16", "float32"] = Field(
        "float16",
        description="the stored log-probabilities: 2 bytes each, or 4 (6k + 4 or 8k + 4 bytes a token)",
    )
    batch_size: int = Field(64, gt=0, description="sequences per teacher forward pass while building")
    show_progress: bool = True


def teacher_identity(teacher: Checkpoint) -> dict[str, Any]:
    """What a cache records of its teacher, and a cell compares: catalog version and a weights digest."""
    return {
        "teacher_version": teacher.metadata.get("catalog_version"),
        "teacher_digest": weights_digest(teacher.model),
        "vocabulary": vocabulary_fingerprint(teacher.tokenizer),
    }


@dataclass
class TeacherTopK:
    """The cache: rows in encoding order, example e's response positions at rows offsets[e]:offsets[e+1]."""

    ids: Tensor  # int32 [P, k]
    logprobs: Tensor  # float16 (or float32) [P, k]: log p_T of each id, most likely first
    tail: (
        Tensor  # float32 [P]: log of the teacher's mass outside the k ids (about LOG_FLOOR when none is left)
    )
    offsets: Tensor  # int64 [E + 1]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def rows(self, example: int) -> tuple[Tensor, Tensor, Tensor]:
        start, end = int(self.offsets[example]), int(self.offsets[example + 1])
        return self.ids[start:end], self.logprobs[start:end], self.tail[start:end]

    @property
    def bytes_per_token(self) -> int:
        return self.k * (self.ids.element_size() + self.logprobs.element_size()) + self.tail.element_size()


def examples_digest(encoded: Sequence[EncodedExample]) -> str:
    """A digest of the exact ids and labels a cell trains on (the cache's rows follow them)."""
    digest = hashlib.sha256()
    for example in encoded:
        digest.update(json.dumps([example.input_ids, example.labels]).encode())
    return digest.hexdigest()[:16]


def tail_log_mass(log_probs: Tensor, top_ids: Tensor) -> Tensor:
    """log of the mass outside `top_ids` [N, k] of each row of `log_probs` [N, V], summed over those tokens
    themselves (not 1 - the top's sum, whose rounding would leave a tail where there is none): about
    LOG_FLOOR where the top k is the whole vocabulary, so that exp() of it is exactly 0."""
    return torch.logsumexp(log_probs.scatter(1, top_ids, LOG_FLOOR), dim=-1)


@torch.no_grad()
def build_teacher_topk(
    teacher: PreTrainedModel,
    encoded: Sequence[EncodedExample],
    pad_id: int,
    k: int,
    temperature: float,
    vocab_size: int,
    batch_size: int,
    metadata: dict[str, Any],
    values_dtype: torch.dtype = torch.float16,
    show_progress: bool = True,
) -> TeacherTopK:
    """Run the teacher once over `encoded` and keep, at every response position, its top-k ids and log p_T
    and the log of the tail mass (over the first `vocab_size` logits: the tokenizer's real vocabulary)."""
    if not 0 < k <= vocab_size:
        raise ValueError(
            f"distill.teacher_cache.top_k must be in [1, {vocab_size}] (the vocabulary), got {k}"
        )
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    ids, logprobs, tails = [], [], []
    for start in tqdm(range(0, len(encoded), batch_size), desc="teacher top-k", disable=not show_progress):
        batch = {key: v.to(device) for key, v in collate(encoded[start : start + batch_size], pad_id).items()}
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        positions, _ = response_positions(batch["labels"], device)
        log_p = torch.log_softmax(
            logits.reshape(-1, logits.shape[-1])[positions, :vocab_size].float() / temperature, -1
        )
        top_logp, top_ids = log_p.topk(k, dim=-1)
        ids.append(top_ids.to(torch.int32).cpu())
        logprobs.append(top_logp.to(values_dtype).cpu())
        tails.append(tail_log_mass(log_p, top_ids).cpu())
    counts = [sum(label != IGNORE_INDEX for label in example.labels[1:]) for example in encoded]
    teacher.train(was_training)
    offsets = torch.zeros(len(encoded) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    cache = TeacherTopK(torch.cat(ids), torch.cat(logprobs), torch.cat(tails).float(), offsets)
    cache.metadata = {
        **metadata,
        "format": CACHE_FORMAT,
        "top_k": k,
        "temperature": float(temperature),
        "vocab_size": vocab_size,
        "examples_digest": examples_digest(encoded),
        "n_examples": len(encoded),
        "n_positions": int(offsets[-1]),
        "values": f"log p at temperature {temperature:g} of the top-{k} ids, {values_dtype}; tail: log of the mass outside them",
        "bytes_per_token": cache.bytes_per_token,
    }
    return cache


def cache_teacher(
    teacher: Checkpoint,
    examples: pd.DataFrame,
    config: TeacherCacheConfig,
    temperature: float,
    max_length: int,
    prompt_overflow: str,
) -> TeacherTopK:
    """The cache of a KD set: its examples encoded as the cells encode them (the tokenizers are the same:
    token-level objectives refuse others), the teacher run once over them."""
    encoded, _ = encode_examples(
        teacher.tokenizer, examples, max_length, prompt_overflow, table_prompt_format(examples)
    )
    _, pad_id = eos_and_pad_ids(teacher.tokenizer)
    return build_teacher_topk(
        teacher.model, encoded, pad_id, config.top_k, temperature, len(teacher.tokenizer), config.batch_size,
        teacher_identity(teacher), values_dtype=getattr(torch, config.values), show_progress=config.show_progress,
    )  # fmt: skip


def check_cache(
    cache: TeacherTopK,
    teacher: dict[str, Any],
    encoded: Sequence[EncodedExample],
    temperature: float,
    top_k: int | None = None,
) -> None:
    """Refuse a cache made by another teacher, for other examples, at another temperature, with another
    `top_k` than the run's (when given) or by an older version of this code, naming what differs and how
    to rebuild."""
    meta = cache.metadata
    problems = []
    if top_k is not None and meta.get("top_k") != top_k:
        problems.append(f"it keeps the top {meta.get('top_k')} ids, distill.teacher_cache.top_k is {top_k}")
    if meta.get("format") != CACHE_FORMAT:
        problems.append(f"it has format {meta.get('format')!r}, this code reads format {CACHE_FORMAT}")
    for key in ("teacher_version", "teacher_digest"):
        if meta.get(key) != teacher.get(key):
            problems.append(
                f"it was made by teacher {key}={meta.get(key)!r}, the run's is {teacher.get(key)!r}"
            )
    if meta.get("examples_digest") != examples_digest(encoded):
        problems.append("it was made for other KD examples (or another encoding of them)")
    if meta.get("temperature") != float(temperature):
        problems.append(
            f"it holds log-probabilities at temperature {meta.get('temperature')}, distill.temperature is {temperature}"
        )
    if problems:
        raise ValueError(
            "distill: the teacher cache `teacher_topk` cannot be used: "
            + "; ".join(problems)
            + f"; {REBUILD}"
        )


@dataclass(frozen=True)
class CachedExample:
    """An encoded example with the teacher's cached rows of its response positions."""

    example: EncodedExample
    ids: Tensor
    logprobs: Tensor
    tail: Tensor


def cached_examples(encoded: Sequence[EncodedExample], cache: TeacherTopK) -> list[CachedExample]:
    return [CachedExample(example, *cache.rows(i)) for i, example in enumerate(encoded)]


def collate_cached(examples: Sequence[CachedExample], pad_id: int) -> dict[str, Tensor]:
    """A `collate` batch plus the cached rows at each example's response positions."""
    batch = collate([e.example for e in examples], pad_id)
    rows, width = batch["input_ids"].shape
    k = examples[0].ids.shape[1]
    ids = torch.zeros(rows, width, k, dtype=torch.int64)
    logprobs = torch.zeros(rows, width, k, dtype=torch.float32)
    tail = torch.full((rows, width), LOG_FLOOR)
    for row, example in enumerate(examples):
        targets = batch["labels"][row, 1:]
        positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        if positions.numel() != example.ids.shape[0]:
            raise ValueError(
                f"the teacher cache has {example.ids.shape[0]} rows for an example with {positions.numel()} "
                f"response positions; {REBUILD}"
            )
        ids[row, positions] = example.ids.long()
        logprobs[row, positions] = example.logprobs.float()
        tail[row, positions] = example.tail
    return {**batch, TOPK_IDS: ids, TOPK_LOGPROBS: logprobs, TAIL_LOGPROB: tail}


def topk_distillation_loss(
    student_logits: Tensor,
    batch: dict[str, Tensor],
    config: KDConfig,
    vocab_size: int,
    ce: bool = True,
    chunk_rows: int = 256,
) -> tuple[Tensor, dict[str, float]]:
    """(1 - kd_rate) CE + kd_rate KD with the teacher read from the cache (a `collate_cached` batch): KD
    between the teacher's cached top-k plus tail and the student's probabilities of the same ids plus its
    own tail, per response position; CE over the student's whole vocabulary, as in distillation_loss
    (`ce=False`: kd_rate KD alone). The student's gradient is computed chunk by chunk (autograd over
    `chunk_rows` positions at a time), so its full [positions, vocab] log-softmax never exists at once.
    Metrics: loss, ce, kd, tokens."""
    positions, targets = response_positions(batch["labels"], student_logits.device)
    flat = student_logits.reshape(-1, student_logits.shape[-1])
    k = batch[TOPK_IDS].shape[-1]
    top_ids = batch[TOPK_IDS].reshape(-1, k)[positions]
    top_logp = batch[TOPK_LOGPROBS].reshape(-1, k)[positions]
    tail = batch[TAIL_LOGPROB].reshape(-1)[positions]
    spec = (config, vocab_size, chunk_rows, ce)
    loss, ce_mean, kd_mean = _TopKLoss.apply(flat, positions, targets, top_ids, top_logp, tail, spec)
    return loss, distillation_metrics(loss, ce_mean, kd_mean, positions)


def _chunk_terms(
    student: Tensor,
    targets: Tensor,
    top_ids: Tensor,
    top_logp: Tensor,
    tail: Tensor,
    config: KDConfig,
    vocab: int,
) -> tuple[Tensor, Tensor]:
    """Summed CE (temperature 1, whole width) and KD ((k + 1)-point distributions at T) of a chunk."""
    ce_sum = -torch.log_softmax(student, dim=-1).gather(1, targets.unsqueeze(1)).sum()
    log_q_all = torch.log_softmax(student[:, :vocab] / config.temperature, dim=-1)
    log_q_tail = tail_log_mass(log_q_all, top_ids).unsqueeze(1)
    log_q = torch.cat([log_q_all.gather(1, top_ids), log_q_tail], dim=-1).clamp(min=LOG_FLOOR)
    log_p = torch.cat([top_logp, tail.unsqueeze(1)], dim=-1).clamp(min=LOG_FLOOR)
    return ce_sum, per_position(config.objective, log_q, log_p, config.options).sum()


class _TopKLoss(torch.autograd.Function):
    """The loss and its gradient w.r.t. the student's flat logits, one chunk of positions at a time."""

    @staticmethod
    def forward(ctx, flat, positions, targets, top_ids, top_logp, tail, spec):  # type: ignore[override]
        config, vocab, chunk_rows, ce = spec
        n = positions.numel()
        ce_weight, kd_weight = ((1.0 - config.kd_rate) if ce else 0.0), float(config.kd_rate)
        grad = torch.zeros_like(flat) if flat.requires_grad else None
        ce_total = torch.zeros((), dtype=torch.float32, device=flat.device)
        kd_total = torch.zeros((), dtype=torch.float32, device=flat.device)
        for start in range(0, n, chunk_rows):
            chunk = slice(start, start + chunk_rows)
            index = positions[chunk]
            with torch.enable_grad():
                rows = flat.detach()[index].float().requires_grad_(grad is not None)
                ce_sum, kd_sum = _chunk_terms(
                    rows, targets[chunk], top_ids[chunk].long(), top_logp[chunk].float(), tail[chunk].float(),
                    config, vocab,
                )  # fmt: skip
                if grad is not None:
                    share = (ce_weight * ce_sum + kd_weight * kd_sum) / max(n, 1)
                    grad[index] = torch.autograd.grad(share, rows)[0].to(grad.dtype)
            ce_total += ce_sum.detach()
            kd_total += kd_sum.detach()
        ctx.grad = grad
        ce_mean, kd_mean = ce_total / max(n, 1), kd_total / max(n, 1)
        loss = ce_weight * ce_mean + kd_weight * kd_mean
        ctx.mark_non_differentiable(ce_mean, kd_mean)
        return loss, ce_mean, kd_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):  # type: ignore[override]
        grad = None if ctx.grad is None else ctx.grad * grad_loss.to(ctx.grad.dtype)
        return grad, None, None, None, None, None, None


# -- on disk ----------------------------------------------------------------------------------------------------
METADATA_FILE = "teacher_topk.json"
SHARD_EXAMPLES = 4096  # examples per shard file


def save_teacher_topk(cache: TeacherTopK, folder: str | Path, shard_examples: int = SHARD_EXAMPLES) -> None:
    """The cache as safetensors shards of `shard_examples` examples each, and its metadata as JSON."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, first in enumerate(range(0, len(cache.offsets) - 1, shard_examples)):
        last = min(first + shard_examples, len(cache.offsets) - 1)
        start, end = int(cache.offsets[first]), int(cache.offsets[last])
        name = f"shard_{number:05d}.safetensors"
        save_file(
            {
                "ids": cache.ids[start:end].contiguous(),
                "logprobs": cache.logprobs[start:end].contiguous(),
                "tail": cache.tail[start:end].contiguous(),
                "offsets": (cache.offsets[first : last + 1] - start).contiguous(),
            },
            str(folder / name),
        )
        shards.append(name)
    (folder / METADATA_FILE).write_text(
        json.dumps({**cache.metadata, "shards": shards}, indent=2, sort_keys=True)
    )


def load_teacher_topk(folder: str | Path) -> TeacherTopK:
    """A cache saved by save_teacher_topk; one of another format is refused, saying how to rebuild."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_file = folder / METADATA_FILE
    if not meta_file.is_file():
        raise ValueError(f"{folder}: not a teacher cache (no {METADATA_FILE}); {REBUILD}")
    metadata = json.loads(meta_file.read_text())
    if metadata.get("format") != CACHE_FORMAT:
        raise ValueError(
            f"{folder}: a teacher cache of format {metadata.get('format')!r}, this code reads format "
            f"{CACHE_FORMAT}; {REBUILD}"
        )
    parts = [load_file(str(folder / name)) for name in metadata.pop("shards")]
    offsets, total = [torch.zeros(1, dtype=torch.int64)], 0
    for part in parts:
        offsets.append(part["offsets"][1:] + total)
        total += int(part["offsets"][-1])
    return TeacherTopK(
        ids=torch.cat([p["ids"] for p in parts]),
        logprobs=torch.cat([p["logprobs"] for p in parts]),
        tail=torch.cat([p["tail"] for p in parts]),
        offsets=torch.cat(offsets),
        metadata=metadata,
    )
