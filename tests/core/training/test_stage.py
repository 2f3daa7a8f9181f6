"""core/training/stage.py: what every training node does around the loop: evaluate at step 0, train, and
return the checkpoint with the same metadata keys for every stage, and the metrics."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import toy_collate, toy_examples, toy_lm_loss, toy_model, training_config
from warmup_distill_kedro.core.models.modeling import Checkpoint, count_parameters
from warmup_distill_kedro.core.training.batches import ShuffledBatches
from warmup_distill_kedro.core.training.stage import last_training_window, train_stage

torch.set_num_threads(1)


def _stage(eval_fn=None, start=None, **changes):
    config = training_config(max_steps=3, log_every=2)
    model = toy_model(seed=1)
    checkpoint, metrics = train_stage(
        model,
        "the tokenizer",
        toy_lm_loss,
        ShuffledBatches(toy_examples(8), 4, toy_collate, seed=0),
        config,
        stage="warmup",
        name="toy stage",
        params=config,
        eval_fn=eval_fn,
        start=start,
        **changes,
    )
    return model, config, checkpoint, metrics


def test_the_checkpoint_carries_the_metadata_every_stage_shares():
    start = Checkpoint(
        None,
        None,
        {"stage": "bootstrap", "catalog_version": "v1", "path": "/ckpt", "source": "s", "other": 1},
    )
    model, config, checkpoint, _ = _stage(start=start, role="teacher", metadata={"warmup_pairs": 5})
    assert checkpoint.model is model and checkpoint.tokenizer == "the tokenizer"
    assert checkpoint.metadata == {
        "role": "teacher",
        "stage": "warmup",
        "parameters": count_parameters(model),
        "steps": 3,
        "params": config.model_dump(mode="json"),
        "started_from": {"stage": "bootstrap", "catalog_version": "v1", "path": "/ckpt", "source": "s"},
        "warmup_pairs": 5,
    }
    _, _, built, _ = _stage()  # a model built from a config starts from nothing
    assert built.metadata["started_from"] is None and built.metadata["role"] == "student"


def test_the_model_is_evaluated_before_its_first_step_and_after_its_last():
    weights = []

    def eval_fn(model):
        weights.append(float(model.lm_head.weight.sum()))
        return {"weight_sum": weights[-1]}

    _, _, _, metrics = _stage(eval_fn=eval_fn)
    assert metrics["steps"] == 3
    assert metrics["initial_weight_sum"] == weights[0] and metrics["final_weight_sum"] == weights[-1]
    assert metrics["initial_weight_sum"] != pytest.approx(metrics["final_weight_sum"])  # it trained
    history = metrics["history"]
    assert history[0] == {"step": 0, "eval/weight_sum": weights[0]}  # step 0 first
    assert [record["step"] for record in history if "loss" in record] == [2, 3]
    _, _, _, without = _stage()
    assert set(without) == {"steps", "history"}  # no evaluation: no initial_* or final_*


def test_the_last_training_window_skips_evaluation_records():
    history = [{"step": 0, "eval/x": 1.0}, {"step": 2, "loss": 0.5, "nll": 0.4}, {"step": 2, "eval/x": 0.9}]
    assert last_training_window(history) == {"loss": 0.5, "nll": 0.4}
    assert last_training_window(history[:1]) == {}
