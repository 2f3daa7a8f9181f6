"""Preference losses for the warmup stage: the student learns to prefer the teacher-corrected response
(chosen) over its own original response (rejected).

DPO (the default) compares the policy with a frozen reference, the student as it was before warmup:
    L = -log sigmoid(beta * [(log q(y+) - log q_ref(y+)) - (log q(y-) - log q_ref(y-))])
with sequence log-probs summed over response tokens. `dpo_nll` adds the chosen token-mean NLL (RPO
style) so the chosen likelihood cannot collapse while the margin grows; `sft` is that NLL alone.
With `reference: teacher` it is DPKD's sequence-level loss (arXiv 2406.19774): the teacher is the reference
and each side's log-ratio is divided by its number of response tokens,
    L = -log sigmoid(beta * [(log q(y+) - log p(y+)) / |y+| - (log q(y-) - log p(y-)) / |y-|]).
All loss arithmetic is float32 whatever the model dtype: sums of hundreds of log-probs and small
beta-scaled differences of them lose too much in bfloat16.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from warmup_distill_kedro.core.models.chat import PromptFormat
from warmup_distill_kedro.core.models.encoding import (
    EncodedExample,
    PromptOverflow,
    collate,
    encode_pairs,
    shifted_token_logprobs,
)

_SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels")  # sequence_logprobs' argument order


class PreferenceLossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loss: Literal["dpo", "dpo_nll", "sft"] = "dpo"
    beta: float = Field(0.1, gt=0, description="DPO temperature: scale of the implicit reward")
    reference: Literal["student", "teacher"] = Field(
        "student",
        description="the frozen reference: the student before warmup (DPO), or the teacher with length-normalized "
        "log-ratios (DPKD's sequence-level form; needs the teacher's tokenizer)",
    )
    nll_weight: float = Field(1.0, ge=0, description="weight of the chosen NLL in dpo_nll")


@dataclass(frozen=True)
class PreferencePair:
    chosen: EncodedExample
    rejected: EncodedExample
    reference_chosen_logp: float = 0.0  # summed response log-prob under the frozen reference
    reference_rejected_logp: float = 0.0


def encode_preference_pairs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    max_length: int,
    prompt_overflow: PromptOverflow = "error",
    chosen_finished: Sequence[bool] | bool = True,
    rejected_finished: Sequence[bool] | bool = True,
    prompt_format: PromptFormat = "plain",
) -> list[PreferencePair]:
    """Encode both sides of each pair with the same prompt; responses are used as given, with an EOS (or
    with `prompt_format` chat the end-of-turn token) after the sides that ended (`*_finished`: per pair,
    or one value for all)."""
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(
            f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected responses: "
            "each prompt needs exactly one of each"
        )
    chosen_encoded, _ = encode_pairs(
        tokenizer, prompts, chosen, max_length, chosen_finished, prompt_overflow, prompt_format
    )
    rejected_encoded, _ = encode_pairs(
        tokenizer, prompts, rejected, max_length, rejected_finished, prompt_overflow, prompt_format
    )
    return [PreferencePair(c, r) for c, r in zip(chosen_encoded, rejected_encoded, strict=True)]


def sequence_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-sequence sum of response-token log-probs (float32, [B]) and the number of such tokens [B]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    token_logprobs, mask = shifted_token_logprobs(logits, labels)  # float32; prompt and padding are 0
    return token_logprobs.sum(dim=-1), mask.sum(dim=-1)


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int) -> dict[str, Tensor]:
    # Chosen and rejected are padded to one common width so the loss can score both in one forward pass.
    joint = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    n = len(pairs)
    batch = {f"chosen_{k}": v[:n] for k, v in joint.items()}
    batch |= {f"rejected_{k}": v[n:] for k, v in joint.items()}
    batch["reference_chosen_logp"] = torch.tensor(
        [p.reference_chosen_logp for p in pairs], dtype=torch.float32
    )
    batch["reference_rejected_logp"] = torch.tensor(
        [p.reference_rejected_logp for p in pairs], dtype=torch.float32
    )
    return batch


def _score_pairs(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Chosen sums and token counts, rejected sums and token counts; one forward over both sides when
    widths match."""
    chosen = [batch[f"chosen_{k}"] for k in _SEQUENCE_KEYS]
    rejected = [batch[f"rejected_{k}"] for k in _SEQUENCE_KEYS]
    if chosen[0].shape[1] == rejected[0].shape[1]:
        sums, counts = sequence_logprobs(
            model, *(torch.cat([c, r]) for c, r in zip(chosen, rejected, strict=True))
        )
        n = chosen[0].shape[0]
        return sums[:n], counts[:n], sums[n:], counts[n:]
    return (*sequence_logprobs(model, *chosen), *sequence_logprobs(model, *rejected))


@torch.no_grad()
def with_reference_logprobs(
    reference_model: nn.Module, pairs: Sequence[PreferencePair], pad_id: int, batch_size: int
) -> list[PreferencePair]:
    """Score every pair once under the frozen reference, before training: cheaper than a reference
    forward every step, and the reference needs no memory during training."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = next(reference_model.parameters()).device
    was_training = reference_model.training
    reference_model.eval()
    scored: list[PreferencePair] = []
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
            chosen_logp, _, rejected_logp, _ = _score_pairs(reference_model, batch)
            scored.extend(
                dataclasses.replace(pair, reference_chosen_logp=c, reference_rejected_logp=r)
                for pair, c, r in zip(chunk, chosen_logp.tolist(), rejected_logp.tolist(), strict=True)
            )
    finally:
        reference_model.train(was_training)
    return scored


def preference_loss(
    policy_chosen_logp: Tensor,
    policy_rejected_logp: Tensor,
    reference_chosen_logp: Tensor,
    reference_rejected_logp: Tensor,
    chosen_nll: Tensor,
    config: PreferenceLossConfig,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The configured loss from [B] summed log-probs and the batch's chosen token-mean NLL (a scalar); the
    sides' response token counts [B] divide the log-ratios with `reference: teacher`."""
    pc, pr, rc, rr = (
        t.float()
        for t in (policy_chosen_logp, policy_rejected_logp, reference_chosen_logp, reference_rejected_logp)
    )
    chosen_nll = chosen_nll.float()
    chosen_reward = config.beta * (pc - rc)
    rejected_reward = config.beta * (pr - rr)
    if config.reference == "teacher":  # DPKD: per-token log-ratios, long and short responses alike
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(
                "reference: teacher divides by the response lengths: pass chosen_tokens and rejected_tokens"
            )
        chosen_reward = chosen_reward / chosen_tokens.float().clamp(min=1)
        rejected_reward = rejected_reward / rejected_tokens.float().clamp(min=1)
    margin = chosen_reward - rejected_reward
    dpo = -torch.nn.functional.logsigmoid(margin).mean()
    if config.loss == "dpo":
        loss = dpo
    elif config.loss == "dpo_nll":
        loss = dpo + config.nll_weight * chosen_nll
    else:  # sft: rewards below are still reported, they show whether SFT alone moves the preference
        loss = chosen_nll
    with torch.no_grad():
        names = ["loss", "reward_margin", "chosen_reward", "rejected_reward", "preference_accuracy"]
        names += ["chosen_logp", "rejected_logp", "chosen_nll"]
        values = torch.stack(
            [
                loss,
                margin.mean(),
                chosen_reward.mean(),
                rejected_reward.mean(),
                (chosen_reward > rejected_reward).float().mean(),
                pc.mean(),
                pr.mean(),
                chosen_nll,
            ]
        ).tolist()  # one device-to-host copy instead of one sync per metric
    return loss, dict(zip(names, values, strict=True))


def preference_loss_fn(
    config: PreferenceLossConfig,
) -> Callable[[nn.Module, dict], tuple[Tensor, dict[str, float]]]:
    """The `loss_fn` for TrainingRun over batches from `collate_pairs`."""

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        chosen_logp, chosen_tokens, rejected_logp, rejected_tokens = _score_pairs(model, batch)
        # Token mean over the batch, as in causal_lm_loss, so that `sft` here is exactly the SFT loss.
        chosen_nll = -chosen_logp.sum() / chosen_tokens.sum().clamp(min=1)
        return preference_loss(
            chosen_logp,
            rejected_logp,
            batch["reference_chosen_logp"],
            batch["reference_rejected_logp"],
            chosen_nll,
            config,
            chosen_tokens,
            rejected_tokens,
        )

    return loss_fn
