"""MiniLLM (arXiv 2306.08543; the official code is microsoft/LMOps `minillm/`): the sequence-level reverse
KL KL(q_theta || p) over whole responses, minimized by policy gradient on the student's own samples.

Rounds of rollouts (`MiniLLMRollouts`): at the start of a round the student, as it is then, answers
`num_rollouts` training prompts, sampling each token from `alpha p + (1 - alpha) q` (core.generation.mixed);
every token y_t of a rollout keeps

    old log q(y_t)   the student's log-probability when it was sampled
    w_t = q(y_t) / (alpha p(y_t) + (1 - alpha) q(y_t))      the per-token importance weight
    r_t = clip((log p(y_t) - log q(y_t)) / reward_scaling, +-cliprange_reward)

and the round's rollouts are trained on for `ppo_epochs` passes of `batch_size` rollouts per step.
The loss of a batch (`minillm_loss`), over its response tokens:

    A_t = sum_{t' >= t} gamma^(t'-t) r_t'  (long_term_from: current, the code's; next: from t + 1, the paper's)
          / the number of tokens from t to the end (length_norm), whitened over the batch (whiten)
    ratio_t = exp(log q(y_t) - old log q(y_t)) w_t
    long-term   mean_t max(-A_t ratio_t, -A_t clip(ratio_t, 1 - cliprange, 1 + cliprange))     (PPO)
    single-step mean_t KL(q(.|y<t) || p(.|y<t)) over the vocabulary (single_step)

    loss = long-term + single-step + lm_coef ((1 - kd_rate) CE + kd_rate fkl) on a batch of the KD examples

Where the official code and the paper differ this follows the code: A_t includes the current token's
reward, so that with the single-step term on, that token's gradient is counted twice (the code calls it
a regularizer; `long_term_from: next` is the paper's unbiased split); the single-step term is not weighted
by w_t. Differences from the code, and why: it whitens advantages over all positions of the padded batch,
this code over the response tokens only (padding would shift the mean with the batch's lengths); it
leaves the end-of-sequence token out of the loss where the tokenizer's pad is its EOS (GPT-2's), this code
trains the decision to stop like any token; its language-modelling term reads OpenWebText, which this
project does not have, so it reads the KD examples (gold or teacher-written responses).
All arithmetic at temperature 1 (the distributions the sequence-level KL is about); the KD temperature
applies to the language-modelling term's fkl only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from warmup_distill_kedro.core.generation.config import SamplingConfig
from warmup_distill_kedro.core.generation.mixed import TeacherMix
from warmup_distill_kedro.core.generation.sampling import generate_from_ids
from warmup_distill_kedro.core.kd.config import KDSettings
from warmup_distill_kedro.core.kd.data import STUDENT_SAMPLED, prompt_length
from warmup_distill_kedro.core.kd.losses import common_vocab, kd_loss
from warmup_distill_kedro.core.models.chat import end_of_turn_id
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX, EncodedExample, collate
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids
from warmup_distill_kedro.core.training.batches import ShuffledBatches

logger = logging.getLogger(__name__)

# Per-token values of a rollout, aligned with input_ids (0 on prompt and padding tokens).
OLD_LOGPROBS, REWARDS, WEIGHTS = "rollout_old_logprobs", "rollout_rewards", "rollout_weights"
LM_PREFIX = "lm_"  # the language-modelling term's batch: lm_input_ids, lm_attention_mask, lm_labels


class MiniLLMConfig(KDSettings):
    """The minillm objective's options; the defaults are the official script's (train_*_xl.sh)."""

    alpha: float = Field(0.2, ge=0, le=1, description="the teacher's share of the sampling distribution")
    gamma: float = Field(0.95, ge=0, le=1, description="discount of future rewards")
    cliprange: float = Field(0.2, gt=0, description="PPO's clip of the importance ratio")
    reward_scaling: float = Field(0.5, gt=0, description="rewards are divided by it")
    cliprange_reward: float = Field(100.0, gt=0, description="rewards are clipped to +- it")
    ppo_epochs: int = Field(4, ge=1, description="passes over each round of rollouts")
    num_rollouts: int = Field(256, ge=1, description="prompts answered per round")
    single_step: bool = Field(True, description="add the single-step term (exact KL over the vocabulary)")
    long_term_from: Literal["current", "next"] = Field(
        "current",
        description="the advantage sums rewards from the current token (the code) or the next (the paper)",
    )
    length_norm: bool = Field(True, description="divide the advantage by the tokens left")
    whiten: bool = Field(True, description="whiten the advantages over the batch's response tokens")
    lm_coef: float = Field(1.0, ge=0, description="weight of (1 - kd_rate) CE + kd_rate fkl on KD examples")

    @classmethod
    def from_options(cls, settings: KDSettings, options: dict[str, Any]) -> MiniLLMConfig:
        return cls(**settings.model_dump(), **options)


# -- the loss ------------------------------------------------------------------------------------------------
def advantages(rewards: Tensor, mask: Tensor, config: MiniLLMConfig) -> Tensor:
    """[B, T] advantages of [B, T] rewards at the response tokens of `mask` (bool; contiguous per row, as a
    response is); 0 elsewhere. See the module doc."""
    rewards = rewards.float() * mask
    steps = rewards.shape[1]
    returns, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        running = rewards[:, t] + config.gamma * running
        returns[:, t] = running
    if config.long_term_from == "next":  # R_{t+1}: the tokens after this one
        returns = torch.nn.functional.pad(returns[:, 1:], (0, 1)) * mask
    if config.length_norm:  # the official code's count of tokens left, from t to the end
        left = mask.float().flip(1).cumsum(1).flip(1)
        returns = returns / left.clamp(min=1)
    if config.whiten:
        values = returns[mask]
        if values.numel() > 1:
            returns = (returns - values.mean()) * torch.rsqrt(values.var(unbiased=False) + 1e-8)
    return returns * mask


def minillm_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    batch: dict[str, Tensor],
    config: MiniLLMConfig,
    vocab_size: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The long-term (PPO) and single-step terms on a batch of rollouts (module doc); logits [B, T, V] of the
    rollouts' input_ids, position t predicting token t + 1. `teacher_logits` may be None when the
    single-step term is off. Metrics: pg, single_step, ratio, reward, advantage_std."""
    labels = batch["labels"]
    mask = labels[:, 1:] != IGNORE_INDEX  # [B, T - 1]: the token each position predicts is a response token
    vocab = common_vocab(
        student_logits.shape[-1],
        (teacher_logits if teacher_logits is not None else student_logits).shape[-1],
        vocab_size,
    )
    logits = student_logits[:, :-1, :vocab].float()
    targets = labels[:, 1:].clamp(min=0)
    logprobs = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    old, weights = batch[OLD_LOGPROBS][:, 1:].float(), batch[WEIGHTS][:, 1:].float()
    advantage = advantages(batch[REWARDS][:, 1:], mask, config)
    ratio = torch.exp((logprobs - old) * mask) * weights
    clipped = ratio.clamp(1.0 - config.cliprange, 1.0 + config.cliprange)
    tokens = mask.sum().clamp(min=1)
    pg = (torch.maximum(-advantage * ratio, -advantage * clipped) * mask).sum() / tokens
    loss, metrics = pg, {"pg": pg.item()}
    if config.single_step:
        assert teacher_logits is not None
        single = kd_loss(
            "rkl", student_logits[:, :-1], teacher_logits[:, :-1], mask, 1.0, config.chunk_size, vocab
        )
        loss = loss + single
        metrics["single_step"] = single.item()
    with torch.no_grad():
        metrics |= {
            "ratio": float((ratio * mask).sum() / tokens),
            "reward": float((batch[REWARDS][:, 1:] * mask).sum() / tokens),
            "tokens": float(mask.sum()),
        }
    return loss, metrics


# -- the rollouts ----------------------------------------------------------------------------------------------
class MiniLLMRollouts:
    """Batches of rollouts, a new round every `ppo_epochs x num_rollouts / batch_size` positions (module doc).

    Position p belongs to round p // per_round; the first position of a round asked for samples the round
    with the student as it is then (the loop asks for a step's batches before it trains on them). The round
    in use is state (`state_dict`): a run that resumes mid-round trains on the same rollouts.
    With `lm_batches`, each batch also carries a batch of KD examples for the language-modelling term.
    """

    def __init__(
        self,
        examples: Sequence[EncodedExample],
        student: PreTrainedModel,
        teacher: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: MiniLLMConfig,
        sampling: SamplingConfig,
        batch_size: int,
        seed: int,
        max_length: int,
        lm_batches: ShuffledBatches | None = None,
    ) -> None:
        self.prompts = [example.input_ids[: prompt_length(example)] for example in examples]
        self.student, self.teacher, self.tokenizer = student, teacher, tokenizer
        self.config = config
        # Sampled at temperature 1 without filtering: the behaviour distribution the importance weights know.
        self.sampling = sampling.model_copy(
            update={
                "do_sample": True,
                "temperature": 1.0,
                "top_p": 1.0,
                "top_k": None,
                "show_progress": False,
            }
        )
        self.rounds = ShuffledBatches(list(range(len(self.prompts))), config.num_rollouts, list, seed)
        self.rollouts_per_round = self.rounds.batch_size
        self.batch_size = min(batch_size, self.rollouts_per_round)
        self.batches_per_epoch = self.rollouts_per_round // self.batch_size
        self.per_round = config.ppo_epochs * self.batches_per_epoch
        self.seed, self.max_length = seed, max_length
        self.lm_batches = lm_batches
        self.round_index: int | None = None
        self.rollouts: list[dict[str, list]] = []
        _, self.pad_id = eos_and_pad_ids(tokenizer)
        self.eos_id = end_of_turn_id(tokenizer, self.sampling.prompt_format)

    def batch(self, position: int) -> dict[str, Tensor]:
        round_index, offset = divmod(position, self.per_round)
        if round_index != self.round_index:
            self.rollouts, self.round_index = self._sample_round(round_index), round_index
        epoch, index = divmod(offset, self.batches_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + round_index * 1_009 + epoch)
        order = torch.randperm(len(self.rollouts), generator=generator).tolist()
        chosen = [self.rollouts[i] for i in order[index * self.batch_size : (index + 1) * self.batch_size]]
        batch = {**_collate_rollouts(chosen, self.pad_id), STUDENT_SAMPLED: torch.tensor(True)}
        if self.lm_batches is not None:
            batch |= {LM_PREFIX + k: v for k, v in self.lm_batches.batch(position).items()}
        return batch

    @torch.no_grad()
    def _sample_round(self, round_index: int) -> list[dict[str, list]]:
        indices = self.rounds.batch(round_index)
        prompts = [self.prompts[i] for i in indices]
        device = next(self.student.parameters()).device
        teacher = self.teacher.to(device).eval()
        mix = TeacherMix(teacher, self.config.alpha) if self.config.alpha > 0 else None
        sampling = self.sampling.model_copy(update={"seed": self.seed * 1_000_003 + round_index})
        generations = generate_from_ids(
            self.student, self.tokenizer, prompts, sampling, "minillm rollouts", teacher_mix=mix
        )
        sequences = []
        for prompt, generation in zip(prompts, generations, strict=True):
            response = generation.token_ids + ([self.eos_id] if generation.finished else [])
            student_logprobs = generation.logprobs + ([generation.eos_logprob] if generation.finished else [])
            keep = max(self.max_length - len(prompt), 0)
            sequences.append((prompt, response[:keep], student_logprobs[:keep]))
        teacher_logprobs = _token_logprobs(
            teacher,
            [p + r for p, r, _ in sequences],
            self.pad_id,
            len(self.tokenizer),
            self.sampling.batch_size,
        )
        rollouts = []
        for (prompt, response, student), scored in zip(sequences, teacher_logprobs, strict=True):
            q = torch.tensor(student, dtype=torch.float64)
            p = torch.tensor(scored[len(prompt) :], dtype=torch.float64)
            alpha = self.config.alpha
            mixed = (
                torch.logaddexp(p + math.log(alpha), q + math.log1p(-alpha))
                if 0 < alpha < 1
                else (p if alpha == 1 else q)
            )
            rewards = ((p - q) / self.config.reward_scaling).clamp(
                -self.config.cliprange_reward, self.config.cliprange_reward
            )
            zeros = [0.0] * len(prompt)
            rollouts.append(
                {
                    "input_ids": prompt + response,
                    "labels": [IGNORE_INDEX] * len(prompt) + response,
                    OLD_LOGPROBS: zeros + q.tolist(),
                    REWARDS: zeros + rewards.tolist(),
                    WEIGHTS: zeros + torch.exp(q - mixed).tolist(),
                }
            )
        finished = sum(g.finished for g in generations)
        logger.info("minillm: round %d, %d rollouts (%d ended)", round_index, len(rollouts), finished)
        return rollouts

    def state_dict(self) -> dict[str, Any]:
        return {"round_index": self.round_index, "rollouts": self.rollouts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round_index, self.rollouts = state["round_index"], list(state["rollouts"])


@torch.no_grad()
def _token_logprobs(
    model: PreTrainedModel, sequences: list[list[int]], pad_id: int, n_tokens: int, batch_size: int
) -> list[list[float]]:
    """Each token's log-probability under `model` given the tokens before it (the first token gets 0.0)."""
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        examples = [EncodedExample(input_ids=s, labels=s, truncated=False) for s in chunk]
        batch = collate(examples, pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        logprobs = logits[:, :-1, :n_tokens].float().log_softmax(-1)
        targets = batch["input_ids"][:, 1:].to(device)
        token = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
        results.extend([0.0, *token[row, : len(s) - 1].tolist()] for row, s in enumerate(chunk))
    return results


def _collate_rollouts(rollouts: Sequence[dict[str, list]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded [B, L] tensors of the rollouts' tokens, labels and per-token values."""
    width = max(len(r["input_ids"]) for r in rollouts)

    def padded(key: str, fill: float | int, dtype: torch.dtype) -> Tensor:
        return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rollouts], dtype=dtype)

    attention = torch.tensor(
        [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rollouts]
    )
    return {
        "input_ids": padded("input_ids", pad_id, torch.long),
        "attention_mask": attention,
        "labels": padded("labels", IGNORE_INDEX, torch.long),
        **{key: padded(key, 0.0, torch.float32) for key in (OLD_LOGPROBS, REWARDS, WEIGHTS)},
    }
