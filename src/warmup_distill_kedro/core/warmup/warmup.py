"""The warmup stage: the student learns from the teacher's corrections before distillation, and its fairness
control gets the same steps as plain SFT.

- `warmup_student`: the vanilla student trained on the corrected set's (chosen = corrected, rejected =
  original) pairs with the configured preference loss (preference.py). DPO's reference is the vanilla
  student itself, frozen, or the teacher (`loss.reference: teacher`, DPKD's sequence-level form); its
  sequence log-probs are computed once, before training.
- `control_student`: the vanilla student trained with the same prompts, steps, batch, learning rate and
  seed, on the gold responses of those prompts instead. Distilling from it tells whether warmup's gain is
  the teacher's corrections or just more training.

Both are validated along the way by the student's NLL of gold validation responses: a warmup that wrecks
the student's language modelling shows up there first.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedTokenizerBase

from warmup_distill_kedro.core.evaluation.likelihood import validation_nll_fn
from warmup_distill_kedro.core.models.chat import PromptFormat, table_prompt_format
from warmup_distill_kedro.core.models.encoding import (
    PromptOverflowParameter,
    causal_lm_loss,
    collate,
    encode_examples,
)
from warmup_distill_kedro.core.models.modeling import Checkpoint, disable_dropout
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids, vocabulary_fingerprint
from warmup_distill_kedro.core.training.batches import ShuffledBatches
from warmup_distill_kedro.core.training.config import TrainingConfig
from warmup_distill_kedro.core.training.loop import EvalFn
from warmup_distill_kedro.core.training.stage import last_training_window, train_stage
from warmup_distill_kedro.core.warmup.preference import (
    PreferenceLossConfig,
    collate_pairs,
    encode_preference_pairs,
    preference_loss_fn,
    with_reference_logprobs,
)

logger = logging.getLogger(__name__)


class WarmupConfig(BaseModel):
    """Train the student on the corrected set (chosen = corrected, rejected = its own original)."""

    model_config = ConfigDict(extra="forbid")

    loss: PreferenceLossConfig = PreferenceLossConfig()
    training: TrainingConfig
    max_length: int = Field(192, gt=8, description="prompt + response tokens; longer responses are cut")
    prompt_overflow: PromptOverflowParameter = "error"
    validation_examples: int = Field(256, gt=0, description="gold validation examples for the NLL guard")
    cut_off: Literal["keep", "drop"] = Field(
        "keep",
        description="a pair with a side cut at a token budget: keep it (that side gets no end-of-sequence "
        "token) or drop it",
    )


def warmup_student(
    student: Checkpoint,
    corrected_set: pd.DataFrame,
    validation_examples: pd.DataFrame,
    config: WarmupConfig,
    teacher: Checkpoint | None = None,
) -> tuple[Checkpoint, dict[str, Any]]:
    """The warmup student: the vanilla student trained on (corrected, original) pairs. `teacher`: the
    reference with `loss.reference: teacher` (unused otherwise)."""
    reference = _reference_model(student, teacher, config)
    pairs = training_rows(corrected_set, config)
    tokenizer = student.tokenizer
    _, pad_id = eos_and_pad_ids(tokenizer)
    # sft rows have no rejected side, and sft ignores it
    rejected = pairs["rejected"].fillna(pairs["chosen"])
    rejected_finished = pairs["rejected_finished"].fillna(pairs["chosen_finished"])
    encoded = encode_preference_pairs(
        tokenizer,
        pairs["prompt"].tolist(),
        pairs["chosen"].tolist(),
        rejected.tolist(),
        config.max_length,
        config.prompt_overflow,
        chosen_finished=pairs["chosen_finished"].astype(bool).tolist(),
        rejected_finished=rejected_finished.astype(bool).tolist(),
        prompt_format=table_prompt_format(corrected_set),
    )
    if config.loss.loss != "sft":
        encoded = with_reference_logprobs(reference, encoded, pad_id, config.training.batch_size)
    logger.info(
        "warmup: %d training rows, loss %s, reference %s",
        len(encoded),
        config.loss.loss,
        config.loss.reference,
    )
    checkpoint, metrics = train_stage(
        # The reference's log-probs were computed in eval mode: the policy trains without dropout too, so
        # that at step 0 the two agree (TRL's disable_dropout).
        disable_dropout(copy.deepcopy(student.model)),
        tokenizer,
        preference_loss_fn(config.loss),
        ShuffledBatches(
            encoded, config.training.batch_size, lambda b: collate_pairs(b, pad_id), config.training.seed
        ),
        config.training,
        stage="warmup",
        name="warmup",
        params=config,
        eval_fn=_validation_nll(tokenizer, validation_examples, config, table_prompt_format(corrected_set)),
        start=student,
        metadata={"warmup_pairs": len(encoded)},
    )
    last = {f"last_{k}": v for k, v in last_training_window(metrics["history"]).items()}
    return checkpoint, {"pairs": len(encoded), **metrics, **last}


def _reference_model(
    student: Checkpoint, teacher: Checkpoint | None, config: WarmupConfig
) -> torch.nn.Module:
    """DPO's frozen reference: the student before warmup, or the teacher (which must read the same tokens)."""
    if config.loss.reference == "student":
        return student.model
    if teacher is None:
        raise ValueError("warmup.loss.reference is teacher but the warmup node got no teacher_model")
    if vocabulary_fingerprint(teacher.tokenizer) != vocabulary_fingerprint(student.tokenizer):
        raise ValueError(
            "warmup.loss.reference: teacher scores the student's token ids with the teacher, but their "
            f"tokenizers differ (teacher {len(teacher.tokenizer)} tokens, student {len(student.tokenizer)}); "
            "use reference: student"
        )
    return teacher.model


def control_student(
    student: Checkpoint,
    corrected_set: pd.DataFrame,
    train_examples: pd.DataFrame,
    validation_examples: pd.DataFrame,
    config: WarmupConfig,
) -> tuple[Checkpoint, dict[str, Any]]:
    """The fairness control: the vanilla student given warmup's extra steps as plain SFT on the gold
    responses of the same prompts (one row per warmup row)."""
    rows = training_rows(corrected_set, config)
    gold = train_examples.drop_duplicates("example_id").set_index("example_id")["response"]
    if missing := sorted(set(rows["prompt_id"]) - set(gold.index))[:5]:
        raise ValueError(
            f"warmup control: corrected_set prompt_id {missing} not found in train_examples; the corrected "
            "set comes from another data run (rerun probe and check)"
        )
    examples = pd.DataFrame({"prompt": rows["prompt"], "response": gold.loc[rows["prompt_id"]].to_numpy()})
    tokenizer = student.tokenizer
    _, pad_id = eos_and_pad_ids(tokenizer)
    prompt_format = table_prompt_format(corrected_set)
    encoded, _ = encode_examples(
        tokenizer, examples, config.max_length, config.prompt_overflow, prompt_format
    )
    checkpoint, metrics = train_stage(
        copy.deepcopy(student.model),
        tokenizer,
        causal_lm_loss,
        ShuffledBatches(
            encoded, config.training.batch_size, lambda b: collate(b, pad_id), config.training.seed
        ),
        config.training,
        stage="warmup_control",
        name="warmup control (SFT)",
        params=config,
        eval_fn=_validation_nll(tokenizer, validation_examples, config, table_prompt_format(corrected_set)),
        start=student,
    )
    return checkpoint, {"rows": len(encoded), **metrics}


def training_rows(corrected_set: pd.DataFrame, config: WarmupConfig) -> pd.DataFrame:
    """The rows the loss can use: pairs for DPO; pairs and kept SFT rows (chosen only) for sft; with
    `cut_off: drop`, only those whose sides all ended."""
    if missing := [c for c in ("chosen_finished", "rejected_finished") if c not in corrected_set]:
        raise ValueError(
            f"warmup: the corrected set has no column {missing[0]!r}: it was written by an older version of "
            "the check stage; run it again (kedro run --pipeline=check)"
        )
    kinds = {"pair", "sft"} if config.loss.loss == "sft" else {"pair"}
    rows = corrected_set[corrected_set["kind"].isin(kinds)].reset_index(drop=True)
    if rows.empty:
        raise ValueError(
            f"warmup: the corrected set has no rows of kind {sorted(kinds)} ({len(corrected_set)} rows in all): "
            "no rollout was corrected. The teacher accepted every sampled token: raise check.tau, use rule "
            "'margin' or 'top_k', sample the probe at a higher temperature, or probe more prompts "
            "(probe.max_prompts, probe.n_samples)."
        )
    if config.cut_off == "drop":
        ended = rows["chosen_finished"].astype(bool) & rows["rejected_finished"].fillna(True).astype(bool)
        logger.info(
            "warmup: %d of %d rows have a side cut at a token budget: dropped", (~ended).sum(), len(rows)
        )
        rows = rows[ended].reset_index(drop=True)
        if rows.empty:
            raise ValueError(
                "warmup: every row of the corrected set has a side cut at a token budget and warmup.cut_off is "
                "drop: raise probe.max_new_tokens and check.continuation.max_new_tokens, or keep them"
            )
    return rows


def _validation_nll(
    tokenizer: PreTrainedTokenizerBase,
    validation_examples: pd.DataFrame,
    config: WarmupConfig,
    prompt_format: PromptFormat,
) -> EvalFn:
    """The gold validation NLL guard both the warmup and its control are evaluated with, in the prompt
    format the corrected set was sampled in."""
    _, pad_id = eos_and_pad_ids(tokenizer)
    validation, _ = encode_examples(
        tokenizer,
        validation_examples.head(config.validation_examples),
        config.max_length,
        config.prompt_overflow,
        prompt_format,
    )
    return validation_nll_fn(validation, pad_id, config.training.batch_size)
