"""Nodes of the `warmup` pipeline: align the student with the teacher's corrections before distillation."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pandas as pd

from warmup_distill_kedro.core.evaluation.likelihood import validation_nll_fn
from warmup_distill_kedro.core.models.encoding import causal_lm_loss, collate, encode_examples
from warmup_distill_kedro.core.models.modeling import Checkpoint, count_parameters
from warmup_distill_kedro.core.models.tokenization import eos_and_pad_ids
from warmup_distill_kedro.core.training.batches import ShuffledBatches
from warmup_distill_kedro.core.training.loop import TrainingRun
from warmup_distill_kedro.core.warmup.preference import (
    collate_pairs,
    encode_preference_pairs,
    preference_loss_fn,
    with_reference_logprobs,
)
from warmup_distill_kedro.pipelines.warmup.params import WarmupParams
from warmup_distill_kedro.tracking import log_step_metrics

logger = logging.getLogger(__name__)


def warmup_student(
    student: Checkpoint, corrected_set: pd.DataFrame, validation_examples: pd.DataFrame, params: WarmupParams
) -> tuple[Checkpoint, dict[str, Any]]:
    """The warmup student: the vanilla student trained on (corrected, original) pairs.

    DPO's reference is the vanilla student itself, frozen; its sequence log-probs are computed once
    before training. The gold validation NLL is evaluated along the way: a warmup that wrecks the
    student's language modelling shows up there first.
    """
    pairs = _training_rows(corrected_set, params)
    tokenizer = student.tokenizer
    _, pad_id = eos_and_pad_ids(tokenizer)
    rejected = pairs["rejected"].fillna(pairs["chosen"])  # sft rows have no rejected side; sft ignores it
    encoded = encode_preference_pairs(
        tokenizer,
        pairs["prompt"].tolist(),
        pairs["chosen"].tolist(),
        rejected.tolist(),
        params.max_length,
        params.prompt_overflow,
    )
    reference = student.model
    if params.loss.loss != "sft":
        encoded = with_reference_logprobs(reference, encoded, pad_id, params.training.batch_size)
    policy = copy.deepcopy(reference)
    validation_nll = _validation_nll(tokenizer, validation_examples, params)
    initial_nll = validation_nll(policy)["validation_nll"]
    logger.info(
        "warmup: %d training rows, loss %s, vanilla validation NLL %.4f",
        len(encoded),
        params.loss.loss,
        initial_nll,
    )
    run = TrainingRun(
        policy,
        preference_loss_fn(params.loss),
        ShuffledBatches(
            encoded, params.training.batch_size, lambda b: collate_pairs(b, pad_id), params.training.seed
        ),
        params.training,
        eval_fn=validation_nll,
        metrics_sink=log_step_metrics,
        name="warmup",
    )
    result = run.run()
    metrics: dict[str, Any] = {
        "pairs": len(encoded),
        "steps": result.steps,
        "initial_validation_nll": initial_nll,
        **{k.replace("eval/", "final_"): v for k, v in result.final_eval.items()},
        **{f"last_{k}": v for k, v in _last_training_metrics(result.history).items()},
    }
    metadata = {
        **{k: v for k, v in student.metadata.items() if k not in ("stage", "steps")},
        "role": "student",
        "stage": "warmup",
        "parameters": count_parameters(result.model),
        "warmup_pairs": len(encoded),
        "steps": result.steps,
        "warmup_params": params.model_dump(mode="json"),
    }
    return Checkpoint(model=result.model, tokenizer=tokenizer, metadata=metadata), metrics


def control_student(
    student: Checkpoint,
    corrected_set: pd.DataFrame,
    train_examples: pd.DataFrame,
    validation_examples: pd.DataFrame,
    params: WarmupParams,
) -> tuple[Checkpoint, dict[str, Any]]:
    """The fairness control: the vanilla student given warmup's extra steps as plain SFT.

    Same prompts as warmup (one row per warmup row), same steps, batch, learning rate and seed, but the
    gold responses of those prompts instead of the (corrected, original) pairs. Distilling from it tells
    whether warmup's gain is the teacher's corrections or just more training.
    """
    rows = _training_rows(corrected_set, params)
    gold = train_examples.drop_duplicates("example_id").set_index("example_id")["response"]
    if missing := sorted(set(rows["prompt_id"]) - set(gold.index))[:5]:
        raise ValueError(
            f"warmup control: corrected_set prompt_id {missing} not found in train_examples; the corrected "
            "set comes from another data run (rerun probe and check)"
        )
    examples = pd.DataFrame({"prompt": rows["prompt"], "response": gold.loc[rows["prompt_id"]].to_numpy()})
    tokenizer = student.tokenizer
    _, pad_id = eos_and_pad_ids(tokenizer)
    encoded, _ = encode_examples(tokenizer, examples, params.max_length, params.prompt_overflow)
    validation_nll = _validation_nll(tokenizer, validation_examples, params)
    policy = copy.deepcopy(student.model)
    initial_nll = validation_nll(policy)["validation_nll"]
    result = TrainingRun(
        policy,
        causal_lm_loss,
        ShuffledBatches(
            encoded, params.training.batch_size, lambda b: collate(b, pad_id), params.training.seed
        ),
        params.training,
        eval_fn=validation_nll,
        metrics_sink=log_step_metrics,
        name="warmup control (SFT)",
    ).run()
    metrics: dict[str, Any] = {
        "rows": len(encoded),
        "steps": result.steps,
        "initial_validation_nll": initial_nll,
        **{k.replace("eval/", "final_"): v for k, v in result.final_eval.items()},
    }
    metadata = {
        **{k: v for k, v in student.metadata.items() if k not in ("stage", "steps")},
        "role": "student",
        "stage": "warmup_control",
        "parameters": count_parameters(result.model),
        "steps": result.steps,
        "training": params.training.model_dump(mode="json"),
    }
    return Checkpoint(model=result.model, tokenizer=tokenizer, metadata=metadata), metrics


def _validation_nll(tokenizer, validation_examples: pd.DataFrame, params: WarmupParams):
    """The gold validation NLL guard both the warmup and its control are evaluated with."""
    _, pad_id = eos_and_pad_ids(tokenizer)
    validation, _ = encode_examples(
        tokenizer,
        validation_examples.head(params.validation_examples),
        params.max_length,
        params.prompt_overflow,
    )
    return validation_nll_fn(validation, pad_id, params.training.batch_size)


def _training_rows(corrected_set: pd.DataFrame, params: WarmupParams) -> pd.DataFrame:
    """The rows the loss can use: pairs for DPO; pairs and kept SFT rows (chosen only) for sft."""
    kinds = {"pair", "sft"} if params.loss.loss == "sft" else {"pair"}
    rows = corrected_set[corrected_set["kind"].isin(kinds)].reset_index(drop=True)
    if rows.empty:
        raise ValueError(
            f"warmup: the corrected set has no rows of kind {sorted(kinds)} ({len(corrected_set)} rows in all): "
            "no rollout was corrected. The teacher accepted every sampled token: raise check.tau, use rule "
            "'margin' or 'top_k', sample the probe at a higher temperature, or probe more prompts "
            "(probe.max_prompts, probe.n_samples)."
        )
    return rows


def _last_training_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    """The last logged training window (not the eval records)."""
    for record in reversed(history):
        if "loss" in record:
            return {k: v for k, v in record.items() if k != "step"}
    return {}
