"""Dual-space knowledge distillation (DSKD, arXiv 2406.17328) and its cross-tokenizer variant DSKD-CMA
(docs/method.md), after the authors' repository (criterions/dual_space_kd*.py).

Plain KD compares distributions that two different heads produce from two different hidden spaces. DSKD
projects hidden states across and reuses one head, so that both distributions of a comparison live in the
same output space:

    student space   z_t2s = W_s . P_t2s(h_t)   (student head W_s detached)
                    ce_t2s     = CE(z_t2s, gold)                    trains P_t2s
                    kd_student = D(z_s, stopgrad(z_t2s))            D = the configured divergence
    teacher space   z_s2t = W_t . P_s2t(h_s)   (frozen teacher head)
                    kd_teacher = FKL(z_s2t, z_t)                    trains P_s2t and the student
    KD   = kd_student + ce_t2s + kd_teacher
    loss = (1 - kd_rate) CE(z_s, gold) + kd_rate KD

Every divergence is `losses.kd_loss` (temperature, options, chunking, vocabulary trimming); nothing here
re-implements one. Positions follow `models.encoding`: logits at t predict labels[t + 1], and only positions
whose next label is a response token (not IGNORE_INDEX) count anywhere.

The projectors live in `StudentWithProjectors`, the module handed to TrainingRun as `model`, so that one
optimizer trains student and projectors together while `.student` stays the plain causal LM to save;
`parameter_groups` gives the projectors their own learning rate (`projector_lr`, 1e-3 in DSKD's scripts).

DSKD-CMA (different tokenizers; the choices below follow DualSpaceKDWithCMA in the DSKD repository):
  - position features: at each position t, [embedding of input token t; embedding of target token t+1],
    from each model's own (detached) input embeddings; outside the response both are token id 0's;
  - queries: `query` Linear(2 d_s, 2 d_t) of the student features;
  - keys: the teacher features divided by their std, used directly (no key projection, as the repo);
  - values: `t2s`(h_t / std(h_t) + e_target / std(e_target)), the teacher's last hidden state plus its
    target embedding, h_t detached. Each std is one number over the whole padded batch, as in the repo
    (`cma_std: batch`), or each position's own (`cma_std: position`: padding and the batch's other
    sequences change nothing);
  - a = softmax(Q K^T / sqrt(2 d_t)) over the teacher's response positions only; a student position with
    none gets a zero row. t2s hidden = a V -> z_t2s with the detached student head;
  - kd_student is kept only where argmax z_t2s equals the student's gold token, and, as in the repo
    (sum over the kept positions / all response tokens), it is the kd_loss mean over the kept positions
    times their share of the student's response positions: few well-aligned positions weigh little;
  - student -> teacher: a separate softmax of the same scores, transposed, over the student's response
    positions (the repo's softmax(align^T)), weights `s2t`(h_s) (not detached: the student learns through
    it) -> z_s2t with the teacher head; kd_teacher = FKL(z_s2t, z_t) over ALL teacher response positions
    (the repo applies no argmax filter on this side), summed and divided by the student's response
    tokens as in the repo (`cma_teacher_kl: per_student_token`), or averaged over the teacher's
    (`per_teacher_token`).

`projector_pretraining_loss` is the ce_t2s term alone: a projector-only warmup before distillation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from warmup_distill_kedro.core.kd.config import KDSettings
from warmup_distill_kedro.core.kd.divergences import OBJECTIVES, validate_options
from warmup_distill_kedro.core.kd.losses import common_vocab, kd_loss
from warmup_distill_kedro.core.models.chat import PromptFormat
from warmup_distill_kedro.core.models.encoding import (
    IGNORE_INDEX,
    EncodedExample,
    collate,
    encode_pairs,
    shifted_token_logprobs,
)

TEACHER_PREFIX = "teacher_"  # teacher-side keys of a dual batch: teacher_input_ids, ...
_STD_EPS = 1e-6


class DSKDConfig(KDSettings):
    """A DSKD / DSKD-CMA run: the student-space divergence, the projectors' rate and pre-training, and the
    shared KD settings."""

    divergence: str = Field("fkl", description=f"student-space divergence, one of {', '.join(OBJECTIVES)}")
    options: dict[str, float | bool | str] = Field(
        default_factory=dict, description="the divergence's options (see divergences.validate_options)"
    )
    projector_lr: float = Field(1e-3, gt=0, allow_inf_nan=False, description="the projectors' own rate")
    pretrain_steps: int = Field(
        0, ge=0, description="steps that train the projectors alone (the CE of the projected teacher) first"
    )
    cma_std: Literal["batch", "position"] = Field(
        "batch",
        description="dskd_cma: keys, teacher hidden states and target embeddings divided by one std over the "
        "whole padded batch (batch: the official code) or by each position's own (position: independent of "
        "padding and of the batch's other sequences)",
    )
    cma_teacher_kl: Literal["per_student_token", "per_teacher_token"] = Field(
        "per_student_token",
        description="dskd_cma: the teacher-space KL summed over the teacher's response tokens and divided by "
        "the student's (per_student_token: the official code), or averaged over the teacher's",
    )

    # The keys of a grid objective's options block that are DSKD's own; the rest are the divergence's.
    OWN_OPTIONS: ClassVar[tuple[str, ...]] = (
        "divergence", "projector_lr", "pretrain_steps", "cma_std", "cma_teacher_kl"
    )  # fmt: skip

    @classmethod
    def from_options(cls, settings: KDSettings, options: Mapping[str, Any]) -> DSKDConfig:
        """The config of a grid objective's options block, e.g. {divergence: js, beta: 0.3, projector_lr:
        0.001}: DSKD's own keys, and the divergence's options."""
        own = {k: v for k, v in options.items() if k in cls.OWN_OPTIONS}
        divergence_options = {k: v for k, v in options.items() if k not in cls.OWN_OPTIONS}
        return cls(**settings.model_dump(), **own, options=divergence_options)

    @field_validator("divergence")
    @classmethod
    def _known_divergence(cls, value: str) -> str:
        if value not in OBJECTIVES:
            raise ValueError(f"unknown divergence {value!r}; choose one of: {', '.join(OBJECTIVES)}")
        return value

    @field_validator("options")
    @classmethod
    def _valid_options(
        cls, value: dict[str, float | bool | str], info: ValidationInfo
    ) -> dict[str, float | bool | str]:
        divergence = info.data.get("divergence")
        if divergence is None:  # the divergence itself failed; its error says so
            return value
        return validate_options(divergence, **value)


class StudentWithProjectors(nn.Module):
    """The student causal LM plus the DSKD projectors, trained together; `.student` is what gets saved.

    t2s: Linear(d_t, d_s), s2t: Linear(d_s, d_t) (with bias, default init); with cross_attention=True
    also `query`: Linear(2 d_s, 2 d_t) for DSKD-CMA. The projectors are float32 on the student's device.
    forward and generate are the student's.

    The projectors' initial weights are drawn from `seed`, not from the global RNG as it happens to be
    (its state depends on what ran before in the process): the same cell starts from the same projectors
    in every run, so that a resumed run ends as an uninterrupted one.
    """

    def __init__(
        self, student: PreTrainedModel, teacher_hidden_size: int, cross_attention: bool = False, seed: int = 0
    ):
        super().__init__()
        if teacher_hidden_size <= 0:
            raise ValueError(f"teacher_hidden_size must be positive, got {teacher_hidden_size}")
        self.student = student
        d_s, d_t = student.get_input_embeddings().embedding_dim, teacher_hidden_size
        device = student.get_input_embeddings().weight.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            self.t2s = nn.Linear(d_t, d_s, device=device)
            self.s2t = nn.Linear(d_s, d_t, device=device)
            self.query = nn.Linear(2 * d_s, 2 * d_t, device=device) if cross_attention else None
        self.cross_attention = cross_attention

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.student(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.student.generate(*args, **kwargs)

    def projector_parameters(self) -> list[nn.Parameter]:
        modules = [self.t2s, self.s2t] + ([self.query] if self.query is not None else [])
        return [p for m in modules for p in m.parameters()]

    def parameter_groups(self, student_lr: float, projector_lr: float) -> list[dict[str, Any]]:
        """Optimizer groups: the student's trainable parameters at student_lr, the projectors at
        projector_lr, e.g. `torch.optim.AdamW(wrapper.parameter_groups(5e-4, config.projector_lr))`."""
        student = [p for p in self.student.parameters() if p.requires_grad]
        return [
            {"params": student, "lr": student_lr},
            {"params": self.projector_parameters(), "lr": projector_lr},
        ]


@dataclass
class DSKDTerms:
    """The separate loss terms (float32 scalars with their graphs) and the student-space logits."""

    ce: Tensor  # CE(z_s, gold), token mean over the student's response positions
    kd_student: Tensor
    ce_t2s: Tensor
    kd_teacher: Tensor
    t2s_logits: Tensor  # z_t2s [B, T, V]: position t predicts the student's token t + 1
    t2s_correct: Tensor  # bool [B, T]: response positions where argmax z_t2s is the gold token
    tokens: Tensor  # number of student response positions
    teacher_tokens: Tensor  # number of teacher response positions

    @property
    def kd(self) -> Tensor:
        return self.kd_student + self.ce_t2s + self.kd_teacher

    def combine(self, kd_rate: float, ce: bool = True) -> tuple[Tensor, dict[str, float]]:
        """(1 - kd_rate) CE + kd_rate KD (kd_rate KD alone with `ce` False: labels the student sampled)."""
        kd = self.kd
        loss = (1.0 - kd_rate) * self.ce + kd_rate * kd if ce else kd_rate * kd
        n = self.tokens.clamp(min=1)
        metrics = {
            "loss": loss.item(),
            "ce": self.ce.item(),
            "kd": kd.item(),
            "kd_student": self.kd_student.item(),
            "kd_teacher": self.kd_teacher.item(),
            "ce_t2s": self.ce_t2s.item(),
            "t2s_accuracy": (self.t2s_correct.sum() / n).item(),
            "tokens": float(self.tokens.item()),
            "teacher_tokens": float(self.teacher_tokens.item()),
        }
        return loss, metrics


# -- pieces -------------------------------------------------------------------------------------------------
def _forward(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(last hidden state, logits); the last entry of hidden_states is what the LM head reads."""
    output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return output.hidden_states[-1], output.logits


def _teacher_forward(teacher: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor):
    with torch.no_grad():
        return _forward(teacher, input_ids, attention_mask)


def _to_vocab(hidden: Tensor, model: PreTrainedModel, vocab: int) -> Tensor:
    """hidden @ W[:vocab]^T (+ bias) with the model's LM head, detached: no gradient reaches the head."""
    head = model.get_output_embeddings()
    bias = None if head.bias is None else head.bias.detach()[:vocab]
    weight = head.weight.detach()[:vocab]
    return torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias)


def _project(linear: nn.Linear, hidden: Tensor) -> Tensor:
    return linear(hidden.to(linear.weight.dtype))


def _next_tokens(labels: Tensor) -> Tensor:
    """[B, T] targets: the label each position predicts (labels[t + 1]; IGNORE_INDEX at the last)."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _ce(logits: Tensor, labels: Tensor) -> Tensor:
    token_logprobs, mask = shifted_token_logprobs(logits, labels)
    return -token_logprobs.sum() / mask.sum().clamp(min=1)


def _correct(logits: Tensor, targets: Tensor) -> Tensor:
    return (logits.argmax(dim=-1) == targets) & (targets != IGNORE_INDEX)


def _kd(
    objective: str, student: Tensor, teacher: Tensor, mask: Tensor, config: DSKDConfig, vocab: int, **options
):
    return kd_loss(
        objective,
        student,
        teacher,
        mask,
        temperature=config.temperature,
        chunk_size=config.chunk_size,
        vocab_size=vocab,
        **options,
    )


def _require(batch: dict[str, Tensor], keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{what} needs batch keys {', '.join(missing)} (have: {', '.join(batch)})")


_STUDENT_KEYS = ("input_ids", "attention_mask", "labels")
_TEACHER_KEYS = tuple(TEACHER_PREFIX + k for k in _STUDENT_KEYS)


# -- DSKD, one tokenizer ------------------------------------------------------------------------------------
def _t2s_same_tokenizer(
    wrapper: StudentWithProjectors, teacher_hidden: Tensor, labels: Tensor, vocab: int
) -> tuple[Tensor, Tensor, Tensor]:
    t2s_logits = _to_vocab(_project(wrapper.t2s, teacher_hidden), wrapper.student, vocab)
    return t2s_logits, _ce(t2s_logits, labels), _correct(t2s_logits, _next_tokens(labels))


def _shared_vocab(wrapper: StudentWithProjectors, teacher: PreTrainedModel, vocab_size: int | None) -> int:
    return common_vocab(
        wrapper.student.get_output_embeddings().weight.shape[0],
        teacher.get_output_embeddings().weight.shape[0],
        vocab_size,
    )


def dskd_terms(
    wrapper: StudentWithProjectors,
    teacher: PreTrainedModel,
    batch: dict[str, Tensor],
    config: DSKDConfig,
    vocab_size: int | None = None,
) -> DSKDTerms:
    """The DSKD terms for a teacher and student that share one tokenizer (a `collate` batch).

    vocab_size: the tokenizer's real size, dropping head rows that either model pads its vocabulary with;
    without it both heads must have the same number of rows.
    """
    _require(batch, _STUDENT_KEYS, "dskd")
    vocab = _shared_vocab(wrapper, teacher, vocab_size)
    input_ids, attention_mask, labels = (batch[k] for k in _STUDENT_KEYS)
    teacher_hidden, teacher_logits = _teacher_forward(teacher, input_ids, attention_mask)
    hidden, logits = _forward(wrapper.student, input_ids, attention_mask)
    mask = _next_tokens(labels) != IGNORE_INDEX

    t2s_logits, ce_t2s, correct = _t2s_same_tokenizer(wrapper, teacher_hidden, labels, vocab)
    kd_student = _kd(config.divergence, logits, t2s_logits.detach(), mask, config, vocab, **config.options)
    s2t_logits = _to_vocab(_project(wrapper.s2t, hidden), teacher, vocab)
    kd_teacher = _kd("fkl", s2t_logits, teacher_logits, mask, config, vocab)
    tokens = mask.sum()
    return DSKDTerms(
        ce=_ce(logits, labels),
        kd_student=kd_student,
        ce_t2s=ce_t2s,
        kd_teacher=kd_teacher,
        t2s_logits=t2s_logits,
        t2s_correct=correct,
        tokens=tokens,
        teacher_tokens=tokens,
    )


def dskd_loss(
    wrapper: StudentWithProjectors,
    teacher: PreTrainedModel,
    batch: dict[str, Tensor],
    config: DSKDConfig,
    vocab_size: int | None = None,
    ce: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """(1 - kd_rate) CE + kd_rate (kd_student + ce_t2s + kd_teacher), and its metrics: loss, ce, kd,
    kd_student, kd_teacher, ce_t2s, t2s_accuracy, tokens, teacher_tokens."""
    return dskd_terms(wrapper, teacher, batch, config, vocab_size).combine(config.kd_rate, ce)


# -- DSKD-CMA, two tokenizers -------------------------------------------------------------------------------
def encode_dual(
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
    finished: Sequence[bool] | bool = True,
    prompt_format: PromptFormat = "plain",
) -> tuple[list[EncodedExample], list[EncodedExample]]:
    """Each (prompt, response) pair encoded by both tokenizers, each with its own EOS (or, chat, its own
    template and end-of-turn token) after a response that ended: (student examples, teacher examples)."""
    student, _ = encode_pairs(
        student_tokenizer, prompts, responses, max_length, finished, "error", prompt_format
    )
    teacher, _ = encode_pairs(
        teacher_tokenizer, prompts, responses, max_length, finished, "error", prompt_format
    )
    return student, teacher


def collate_dual(
    student_examples: Sequence[EncodedExample],
    teacher_examples: Sequence[EncodedExample],
    student_pad_id: int,
    teacher_pad_id: int,
) -> dict[str, Tensor]:
    """A `collate` batch for each side: input_ids, attention_mask, labels and teacher_input_ids,
    teacher_attention_mask, teacher_labels; row i of both sides is the same example."""
    if len(student_examples) != len(teacher_examples):
        raise ValueError(
            f"{len(student_examples)} student examples but {len(teacher_examples)} teacher examples"
        )
    student = collate(student_examples, student_pad_id)
    teacher = collate(teacher_examples, teacher_pad_id)
    return {**student, **{TEACHER_PREFIX + k: v for k, v in teacher.items()}}


def _position_features(
    model: PreTrainedModel, input_ids: Tensor, targets: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """[input embedding; target embedding] per position, detached, and the target embeddings alone. As in
    the official code, positions outside the response (prompt, padding) embed token id 0: they attend and
    are attended by nothing, but they enter a whole-batch std."""
    embed = model.get_input_embeddings()
    with torch.no_grad():
        target_embeds = embed(torch.where(mask, targets, 0))
        features = torch.cat([embed(torch.where(mask, input_ids, 0)), target_embeds], dim=-1)
    return features.float(), target_embeds.float()


def _std_normalised(x: Tensor, how: str) -> Tensor:
    """x divided by its std, the std detached: one over every element of the padded batch (`batch`, the
    official code), or each position's own, over the hidden dim (`position`)."""
    if how == "batch":
        return x / x.detach().std().clamp(min=_STD_EPS)
    return x / x.detach().std(dim=-1, keepdim=True).clamp(min=_STD_EPS)


def _masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """softmax over the last dim restricted to mask; rows with nothing masked in are all zeros."""
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1) * mask


@dataclass
class _Alignment:
    scores: Tensor  # [B, Ts, Tt] Q K^T / sqrt(2 d_t)
    pair_mask: Tensor  # [B, Ts, Tt] student response position x teacher response position
    t2s_logits: Tensor
    ce_t2s: Tensor
    correct: Tensor
    teacher_hidden: Tensor
    teacher_logits: Tensor
    teacher_mask: Tensor


def _align(
    wrapper: StudentWithProjectors,
    teacher: PreTrainedModel,
    batch: dict[str, Tensor],
    student_vocab: int,
    std: str,
) -> _Alignment:
    if wrapper.query is None:
        raise ValueError("dskd_cma needs a StudentWithProjectors built with cross_attention=True")
    _require(batch, _STUDENT_KEYS + _TEACHER_KEYS, "dskd_cma")
    labels, teacher_labels = batch["labels"], batch[TEACHER_PREFIX + "labels"]
    targets, teacher_targets = _next_tokens(labels), _next_tokens(teacher_labels)
    mask, teacher_mask = targets != IGNORE_INDEX, teacher_targets != IGNORE_INDEX
    teacher_ids = batch[TEACHER_PREFIX + "input_ids"]
    teacher_hidden, teacher_logits = _teacher_forward(
        teacher, teacher_ids, batch[TEACHER_PREFIX + "attention_mask"]
    )

    student_features, _ = _position_features(wrapper.student, batch["input_ids"], targets, mask)
    teacher_features, teacher_target_embeds = _position_features(
        teacher, teacher_ids, teacher_targets, teacher_mask
    )
    queries = _project(wrapper.query, student_features)  # [B, Ts, 2 d_t]
    keys = _std_normalised(teacher_features, std)  # [B, Tt, 2 d_t]
    values = _project(
        wrapper.t2s,
        _std_normalised(teacher_hidden.float(), std) + _std_normalised(teacher_target_embeds, std),
    )  # [B, Tt, d_s]
    scores = queries @ keys.transpose(-1, -2) / math.sqrt(keys.shape[-1])
    pair_mask = mask.unsqueeze(-1) & teacher_mask.unsqueeze(1)
    t2s_hidden = _masked_softmax(scores, pair_mask) @ values.to(scores.dtype)
    t2s_logits = _to_vocab(t2s_hidden, wrapper.student, student_vocab)
    return _Alignment(
        scores=scores,
        pair_mask=pair_mask,
        t2s_logits=t2s_logits,
        ce_t2s=_ce(t2s_logits, labels),
        correct=_correct(t2s_logits, targets),
        teacher_hidden=teacher_hidden,
        teacher_logits=teacher_logits,
        teacher_mask=teacher_mask,
    )


def _vocab_of(model: PreTrainedModel, vocab_size: int | None, which: str) -> int:
    rows = model.get_output_embeddings().weight.shape[0]
    if vocab_size is None:
        return rows
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 0 < vocab_size <= rows:
        raise ValueError(
            f"{which}_vocab_size must be an integer in [1, {rows}] (its head's rows), got {vocab_size!r}"
        )
    return vocab_size


def dskd_cma_terms(
    wrapper: StudentWithProjectors,
    teacher: PreTrainedModel,
    batch: dict[str, Tensor],
    config: DSKDConfig,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
) -> DSKDTerms:
    """The DSKD-CMA terms for a teacher with its own tokenizer (a `collate_dual` batch); see the module doc.

    student_vocab_size / teacher_vocab_size: each tokenizer's real size (None: all of that head's rows).
    """
    student_vocab = _vocab_of(wrapper.student, student_vocab_size, "student")
    teacher_vocab = _vocab_of(teacher, teacher_vocab_size, "teacher")
    align = _align(wrapper, teacher, batch, student_vocab, config.cma_std)
    hidden, logits = _forward(wrapper.student, batch["input_ids"], batch["attention_mask"])
    tokens = (_next_tokens(batch["labels"]) != IGNORE_INDEX).sum()

    # Student space, only where the aligned teacher representation predicts the gold token; weighted by
    # that share of the response positions (the repo sums over the kept positions / all tokens).
    kept = align.correct
    kd_student = _kd(
        config.divergence, logits, align.t2s_logits.detach(), kept, config, student_vocab, **config.options
    ) * (kept.sum() / tokens.clamp(min=1))

    # Teacher space: each teacher response position attends over the student's response positions.
    s2t_weights = _masked_softmax(align.scores.transpose(-1, -2), align.pair_mask.transpose(-1, -2))
    s2t_hidden = s2t_weights @ _project(wrapper.s2t, hidden).to(s2t_weights.dtype)
    s2t_logits = _to_vocab(s2t_hidden, teacher, teacher_vocab)
    kd_teacher = _kd("fkl", s2t_logits, align.teacher_logits, align.teacher_mask, config, teacher_vocab)
    teacher_tokens = align.teacher_mask.sum()
    if config.cma_teacher_kl == "per_student_token":  # the official code: its sum over the teacher's tokens
        kd_teacher = kd_teacher * (teacher_tokens / tokens.clamp(min=1))  # per student token
    return DSKDTerms(
        ce=_ce(logits, batch["labels"]),
        kd_student=kd_student,
        ce_t2s=align.ce_t2s,
        kd_teacher=kd_teacher,
        t2s_logits=align.t2s_logits,
        t2s_correct=kept,
        tokens=tokens,
        teacher_tokens=teacher_tokens,
    )


def dskd_cma_loss(
    wrapper: StudentWithProjectors,
    teacher: PreTrainedModel,
    batch: dict[str, Tensor],
    config: DSKDConfig,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """(1 - kd_rate) CE + kd_rate (kd_student + ce_t2s + kd_teacher) across tokenizers, with the metrics of
    dskd_loss (t2s_accuracy is also the share of positions kd_student is kept at)."""
    terms = dskd_cma_terms(wrapper, teacher, batch, config, student_vocab_size, teacher_vocab_size)
    return terms.combine(config.kd_rate)


# -- projector pre-training ---------------------------------------------------------------------------------
def projector_pretraining_loss(
    wrapper: StudentWithProjectors,
    teacher: PreTrainedModel,
    batch: dict[str, Tensor],
    vocab_size: int | None = None,
    cma_std: str = "batch",
) -> tuple[Tensor, dict[str, float]]:
    """ce_t2s alone: trains t2s (and, for CMA, query) and nothing of the student, whose head and embeddings
    enter detached; the student's transformer is not even run. A wrapper built with cross_attention=True
    takes a `collate_dual` batch (`cma_std` as in DSKDConfig), otherwise a `collate` batch. vocab_size: the
    student tokenizer's size. Metrics: loss, ce_t2s, t2s_accuracy, tokens. Optimise
    `wrapper.projector_parameters()` only."""
    if wrapper.cross_attention:
        student_vocab = _vocab_of(wrapper.student, vocab_size, "student")
        align = _align(wrapper, teacher, batch, student_vocab, cma_std)
        ce_t2s, correct = align.ce_t2s, align.correct
    else:
        _require(batch, _STUDENT_KEYS, "projector pre-training")
        vocab = _shared_vocab(wrapper, teacher, vocab_size)
        teacher_hidden, _ = _teacher_forward(teacher, batch["input_ids"], batch["attention_mask"])
        _, ce_t2s, correct = _t2s_same_tokenizer(wrapper, teacher_hidden, batch["labels"], vocab)
    tokens = (_next_tokens(batch["labels"]) != IGNORE_INDEX).sum()
    metrics = {
        "loss": ce_t2s.item(),
        "ce_t2s": ce_t2s.item(),
        "t2s_accuracy": (correct.sum() / tokens.clamp(min=1)).item(),
        "tokens": float(tokens.item()),
    }
    return ce_t2s, metrics
