"""Scores of gold responses under a model: nothing is generated.

* ``response_nll``: the token-mean NLL of the response tokens (the SFT loss); ``validation_nll_fn`` makes it
  a training loop's eval_fn.
* ``response_scores``: the one forward loop over gold responses: per batch, the response positions and both
  models' log-probabilities there.
* ``heldout_distribution``: the student's NLL and entropy, the teacher's entropy and KL(teacher || student),
  token means over response tokens only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX, EncodedExample, causal_lm_loss, collate


@torch.no_grad()
def response_nll(
    model: torch.nn.Module, encoded: Sequence[EncodedExample], pad_id: int, batch_size: int
) -> float:
    """Token-mean negative log-likelihood of the response tokens (the SFT loss, without smoothing)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0.0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], pad_id)
        loss, metrics = causal_lm_loss(model, {k: v.to(device) for k, v in batch.items()})
        total += loss.item() * metrics["tokens"]
        tokens += metrics["tokens"]
    model.train(was_training)
    return total / max(tokens, 1.0)


def validation_nll_fn(
    encoded: Sequence[EncodedExample], pad_id: int, batch_size: int
) -> Callable[[torch.nn.Module], dict[str, float]]:
    """The eval_fn of an SFT-style training run: `{"validation_nll": ...}` on `encoded` gold examples."""

    def validation_nll(model: torch.nn.Module) -> dict[str, float]:
        return {"validation_nll": response_nll(model, encoded, pad_id, batch_size)}

    return validation_nll


@dataclass(frozen=True)
class ResponseScores:
    """The response positions of one batch (prompt and padding dropped), in row-major order: what the
    held-out statistics and the per-token explanations (core/evaluation/explain.py) read."""

    examples: torch.Tensor  # [N] index into `encoded` of the example each position belongs to
    positions: torch.Tensor  # [N] the position within that example's response, from 0
    targets: torch.Tensor  # [N] the gold token each position predicts
    student: torch.Tensor  # [N, V] the student's float32 log-probabilities at temperature 1
    teacher: torch.Tensor | None  # [N, V] the teacher's, where the vocabularies are compared


@torch.no_grad()
def response_scores(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    encoded: Sequence[EncodedExample],
    pad_id: int,
    batch_size: int,
    vocab_size: int | None,
) -> Iterator[ResponseScores]:
    """One forward pass per batch of `encoded` for each model, the gold response positions of each batch.

    With a `teacher` that shares the vocabulary (`vocab_size` = the columns both mean the same by) the
    teacher's log-probabilities come too; `vocab_size` None: different tokenizers, the student's use all
    its columns. A `teacher` that is the student itself is not run twice.
    """
    device = next(student.parameters()).device
    compare = teacher is not None and vocab_size is not None
    if compare and teacher is not student:
        teacher = teacher.to(device)  # a frozen teacher may still sit where it was loaded
    was_training = student.training
    student.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded[start : start + batch_size], pad_id).items()}
            labels = batch["labels"][:, 1:]
            mask = labels != IGNORE_INDEX  # position t predicts token t + 1
            # Only the response rows go through float32 log-softmax: [tokens, vocab], never [batch, length, vocab].
            student_logp = _response_logprobs(student, batch, mask, vocab_size)
            teacher_logp = None
            if compare:
                same = teacher is student
                teacher_logp = student_logp if same else _response_logprobs(teacher, batch, mask, vocab_size)
            rows = mask.nonzero()[:, 0]
            yield ResponseScores(
                examples=start + rows,
                positions=(mask.cumsum(1) - 1)[mask],
                targets=labels[mask],
                student=student_logp,
                teacher=teacher_logp,
            )
    finally:
        student.train(was_training)


def heldout_distribution(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    encoded: Sequence[EncodedExample],
    pad_id: int,
    batch_size: int,
    vocab_size: int | None,
) -> dict[str, float]:
    """Token means over the gold response tokens of `encoded` (prompt and padding masked out).

    `heldout_nll` and `heldout_entropy` are the student's; with a `teacher` that shares the vocabulary
    (`vocab_size` = the columns both mean the same by), `teacher_heldout_entropy` and `heldout_kl` =
    KL(teacher || student) at temperature 1 as well. `vocab_size` None: different tokenizers, so there is
    no token-level comparison; the student's statistics use all its columns.
    """
    compare = teacher is not None and vocab_size is not None
    sums = {"heldout_nll": 0.0, "heldout_entropy": 0.0, "teacher_heldout_entropy": 0.0, "heldout_kl": 0.0}
    tokens = 0
    for scores in response_scores(student, teacher, encoded, pad_id, batch_size, vocab_size):
        student_logp, teacher_logp = scores.student, scores.teacher
        sums["heldout_nll"] -= float(student_logp.gather(-1, scores.targets.unsqueeze(-1)).sum())
        sums["heldout_entropy"] += float(_entropy(student_logp).sum())
        if teacher_logp is not None:
            sums["teacher_heldout_entropy"] += float(_entropy(teacher_logp).sum())
            sums["heldout_kl"] += float((teacher_logp.exp() * (teacher_logp - student_logp)).sum())
        tokens += len(scores.targets)
    if tokens == 0:
        raise ValueError("heldout_distribution: the examples have no response tokens")
    keys = sums if compare else ("heldout_nll", "heldout_entropy")
    return {key: sums[key] / tokens for key in keys}


def _response_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor, vocab_size: int | None
) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1][mask][:, :vocab_size].float().log_softmax(-1)


def _entropy(logprobs: torch.Tensor) -> torch.Tensor:
    # exp(-inf) * -inf is nan: a column with probability 0 contributes 0.
    return -(logprobs.exp() * logprobs.clamp_min(torch.finfo(logprobs.dtype).min)).sum(-1)
