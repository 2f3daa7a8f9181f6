"""One training stage, from a model to a trained checkpoint and its metrics: what every training node does
(the bootstrap SFT, the warmup, its fairness control and each distill cell) around its own loss and data.

The stage evaluates the model before its first step (step 0 of its history and of the tracked curves),
trains it with `TrainingRun`, and returns the trained model as a `Checkpoint` whose metadata has the same
keys for every stage: `role`, `stage`, `parameters`, `steps`, `params` (the stage's parameters as given),
`started_from` (the stage, catalog version and path of the checkpoint it started from), plus what the
stage adds. Its metrics: `steps`, `initial_<eval>` and `final_<eval>` for every evaluated quantity, and
`history` (every logged window and evaluation, step 0 first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from warmup_distill_kedro.core.models.modeling import Checkpoint, count_parameters
from warmup_distill_kedro.core.training.batches import BatchSource
from warmup_distill_kedro.core.training.config import TrainingConfig
from warmup_distill_kedro.core.training.loop import EvalFn, LossFn, TrainingRun

EVAL_PREFIX = "eval/"
_LINEAGE_KEYS = ("stage", "catalog_version", "path", "source")


def train_stage(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    loss_fn: LossFn,
    data: BatchSource,
    training: TrainingConfig,
    *,
    stage: str,
    name: str,
    params: BaseModel,
    eval_fn: EvalFn | None = None,
    parameter_groups: Sequence[dict[str, Any]] | None = None,
    trained: nn.Module | None = None,
    start: Checkpoint | None = None,
    role: str = "student",
    metadata: Mapping[str, Any] | None = None,
) -> tuple[Checkpoint, dict[str, Any]]:
    """Train `model` for `training.max_steps` steps and return (checkpoint, metrics).

    `model` is what the loop trains (a copy of the start model, or a student with its projectors);
    `trained` is the causal LM inside it that is saved (default: `model` itself). `start` is the checkpoint
    it was copied from (for lineage; None for a model built from a config). `metadata` adds stage-specific
    keys to the checkpoint's.
    """
    run = TrainingRun(
        model,
        loss_fn,
        data,
        training,
        parameter_groups=parameter_groups,
        eval_fn=eval_fn,
        name=name,
    )
    initial = evaluate_before_training(run)
    result = run.run()
    saved = trained if trained is not None else result.model
    metrics: dict[str, Any] = {
        "steps": result.steps,
        **{f"initial_{k.removeprefix(EVAL_PREFIX)}": v for k, v in initial.items()},
        **{f"final_{k.removeprefix(EVAL_PREFIX)}": v for k, v in result.final_eval.items()},
        "history": list(result.history),  # the evaluation at step 0 first
    }
    checkpoint_metadata = {
        "role": role,
        "stage": stage,
        "parameters": count_parameters(saved),
        "steps": result.steps,
        "params": params.model_dump(mode="json"),
        "started_from": {k: start.metadata.get(k) for k in _LINEAGE_KEYS} if start is not None else None,
        **(metadata or {}),
    }
    return Checkpoint(model=saved, tokenizer=tokenizer, metadata=checkpoint_metadata), metrics


def evaluate_before_training(run: TrainingRun) -> dict[str, float]:
    """The run's evaluation of the model as it starts, recorded and reported at step 0 ({} without an
    eval_fn). A resumed run evaluates again; its history then comes back from the saved state."""
    if run.eval_fn is None:
        return {}
    return run.evaluate()


def last_training_window(history: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The last logged training window of a history (not an evaluation record), without its step."""
    for record in reversed(history):
        if "loss" in record:
            return {k: v for k, v in record.items() if k != "step"}
    return {}
