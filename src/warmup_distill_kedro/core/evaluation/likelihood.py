"""Scores of gold responses under a model: nothing is generated.

* ``response_nll``: the token-mean NLL of the response tokens (the SFT loss); ``validation_nll_fn`` makes it
  a training loop's eval_fn.
* ``heldout_distribution``: the student's NLL and entropy, the teacher's entropy and KL(teacher || student),
  token means over response tokens only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


@torch.no_grad()
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
    device = next(student.parameters()).device
    compare = teacher is not None and vocab_size is not None
    if compare:
        teacher = teacher.to(device)  # a frozen teacher may still sit where it was loaded
    was_training = student.training
    student.eval()
    sums = {"heldout_nll": 0.0, "heldout_entropy": 0.0, "teacher_heldout_entropy": 0.0, "heldout_kl": 0.0}
    tokens = 0
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded[start : start + batch_size], pad_id).items()}
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX  # position t predicts token t + 1
        # Only the response rows go through float32 log-softmax: [tokens, vocab], never [batch, length, vocab].
        student_logp = _response_logprobs(student, batch, mask, vocab_size)
        targets = labels[mask]
        sums["heldout_nll"] -= float(student_logp.gather(-1, targets.unsqueeze(-1)).sum())
        sums["heldout_entropy"] += float(_entropy(student_logp).sum())
        if compare:
            teacher_logp = _response_logprobs(teacher, batch, mask, vocab_size)
            sums["teacher_heldout_entropy"] += float(_entropy(teacher_logp).sum())
            sums["heldout_kl"] += float((teacher_logp.exp() * (teacher_logp - student_logp)).sum())
        tokens += int(mask.sum())
    student.train(was_training)
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
