"""Sampling from the teacher-mixed distribution `alpha p + (1 - alpha) q` (MiniLLM, arXiv 2306.08543).

MiniLLM's student samples its training responses from a mixture of its own next-token distribution q and
the teacher's p, which keeps early rollouts from drifting into text the teacher finds absurd. The mixture is
a logits processor of the student's `generate`: at each step it runs the teacher on the new token with the
teacher's own KV cache, and returns log(alpha p + (1 - alpha) q) as the scores to sample from. Both models
see the same left-padded batch; the teacher's positions follow the attention mask, as generate's do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import LogitsProcessor, PreTrainedModel


@dataclass(frozen=True)
class TeacherMix:
    """The teacher and its share of the sampling distribution (alpha in (0, 1])."""

    teacher: PreTrainedModel
    alpha: float

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(
                f"the teacher's share of the sampling distribution must be in (0, 1], got {self.alpha}"
            )

    def processor(self, attention_mask: Tensor, n_tokens: int) -> TeacherMixProcessor:
        return TeacherMixProcessor(self.teacher, self.alpha, attention_mask, n_tokens)


class TeacherMixProcessor(LogitsProcessor):
    """Scores = log(alpha softmax(teacher) + (1 - alpha) softmax(student)) over the first `n_tokens` ids (the
    tokenizer's; padding rows of either head get -inf), for one batch of one `generate` call."""

    def __init__(self, teacher: PreTrainedModel, alpha: float, attention_mask: Tensor, n_tokens: int) -> None:
        self.teacher = teacher
        self.log_alpha, self.log_rest = math.log(alpha), math.log1p(-alpha) if alpha < 1.0 else -math.inf
        self.prompt_mask = attention_mask
        self.n_tokens = n_tokens
        self.cache = None
        self.seen = 0  # tokens of input_ids the teacher has read

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids.shape[1] - self.prompt_mask.shape[1]
        ones = self.prompt_mask.new_ones(input_ids.shape[0], generated)
        mask = torch.cat([self.prompt_mask, ones], dim=1)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        output = self.teacher(
            input_ids=input_ids[:, self.seen :],
            attention_mask=mask,
            position_ids=positions[:, self.seen :],
            cache=self.cache,
            use_cache=True,
        )
        self.cache, self.seen = output.cache, input_ids.shape[1]
        teacher = output.logits[:, -1, : self.n_tokens].float().log_softmax(dim=-1)
        student = scores[:, : self.n_tokens].float().log_softmax(dim=-1)
        mixed = torch.logaddexp(teacher + self.log_alpha, student + self.log_rest)
        return torch.nn.functional.pad(mixed, (0, scores.shape[1] - self.n_tokens), value=-math.inf).to(
            scores.dtype
        )
