"""core/kd/cell.py: one grid cell. distill.fused_head: a token-level cell gives the same loss, metrics,
gradients and training run from the last hidden states and the heads as from the full logits; and the
settings every cell shares (DistillConfig) refuse what cannot run."""

from __future__ import annotations

import random

import pandas as pd
import pytest
import torch

from tests.helpers import TINY, bpe_tokenizer, tiny_checkpoint
from warmup_distill_kedro.core.kd.cell import DistillConfig, _token_level_cell
from warmup_distill_kedro.core.kd.cell import distill_cell as distill_student
from warmup_distill_kedro.core.kd.losses import KDConfig
from warmup_distill_kedro.core.models.modeling import Checkpoint, ModelSize

torch.set_num_threads(1)


def _examples(n: int = 24, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        rows.append({"prompt": f"What is {a} plus {b}?", "response": f"It is {a + b}."})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def checkpoints() -> tuple[Checkpoint, Checkpoint]:
    examples = _examples()
    tokenizer = bpe_tokenizer((examples["prompt"] + examples["response"]).tolist(), min_frequency=1)
    teacher_size = ModelSize(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48)
    # The student ties its head to its input embeddings (the default): one parameter, two gradient paths.
    return tiny_checkpoint(tokenizer, teacher_size, seed=1), tiny_checkpoint(tokenizer, TINY, seed=2)


def _params(**changes) -> DistillConfig:
    training = {"max_steps": 2, "batch_size": 6, "learning_rate": 1e-2, "show_progress": False}
    fields = {
        "chunk_size": 5,
        "max_length": 32,
        "validation_examples": 6,
        "data": {"mode": "off_policy"},
        "training": training,
    }
    return DistillConfig(**{**fields, **changes})


@pytest.mark.parametrize(("objective", "kd_rate"), [("fkl", 0.5), ("akl", 0.5), ("js", 1.0)])
def test_a_fused_cell_gives_the_same_loss_metrics_and_gradients(checkpoints, objective, kd_rate):
    from warmup_distill_kedro.core.models.encoding import encode_examples

    teacher, student = checkpoints
    encoded, _ = encode_examples(student.tokenizer, _examples(), 32)
    results = []
    for fused in (False, True):
        cell = _token_level_cell(
            teacher, student, encoded, _params(fused_head=fused, kd_rate=kd_rate), objective
        )
        batch = cell.source.batch(0)
        loss, metrics = cell.loss_fn(cell.model, batch)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in cell.model.named_parameters() if p.grad is not None}
        results.append((loss.item(), metrics, grads))
    (loss, metrics, grads), (fused_loss, fused_metrics, fused_grads) = results
    assert metrics["tokens"] > 0
    assert fused_loss == pytest.approx(loss, rel=1e-5)
    assert fused_metrics == pytest.approx(metrics, rel=1e-5, abs=1e-7)
    assert fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item())


def test_a_fused_distill_run_trains_the_same_student(checkpoints):
    """Two optimizer steps through TrainingRun (accelerate's wrapper included) and the held-out metrics."""
    teacher, student = checkpoints
    examples = _examples()
    trained = [
        distill_student(teacher, student, examples, examples, _params(fused_head=fused), "vanilla", "srkl")
        for fused in (False, True)
    ]
    (plain, plain_metrics), (fused, fused_metrics) = trained
    assert fused_metrics["final_validation_nll"] == pytest.approx(
        plain_metrics["final_validation_nll"], rel=1e-4
    )
    for (name, p), q in zip(plain.model.named_parameters(), fused.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


def test_the_shared_settings_refuse_what_cannot_run():
    training = {"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3}
    with pytest.raises(ValueError, match="fused_head: true needs chunk_size"):
        DistillConfig(fused_head=True, training=training)
    with pytest.raises(ValueError, match=r"options\.js: .*beta"):
        DistillConfig(options={"js": {"beta": 0.0}}, training=training)
    with pytest.raises(ValueError, match=r"options\.sft: plain SFT takes no options"):
        DistillConfig(options={"sft": {"alpha": 0.1}}, training=training)
    with pytest.raises(ValueError, match=r"options\.kl2: unknown objective 'kl2'"):
        DistillConfig(options={"kl2": {}}, training=training)


def test_each_objective_gets_its_loss_settings():
    config = DistillConfig(
        temperature=1.5,
        kd_rate=0.25,
        options={"js": {"beta": 0.3}},
        training={"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3},
    )
    js = config.loss_config("js")
    assert isinstance(js, KDConfig)
    assert (js.objective, js.temperature, js.kd_rate, js.options) == (
        "js",
        1.5,
        0.25,
        {"beta": 0.3, "normalized": False},
    )
    assert config.loss_config("fkl").options == {}
    assert config.loss_config("sft") is None  # the baseline has no KD loss


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("objective", ["fkl", "dskd"])
def test_no_ce_on_the_students_own_samples(checkpoints, objective, fused):
    """on_policy with lmbda 1: every batch is the student's own samples, and the loss is kd_rate x KD, no
    CE term (GKD and DistiLLM have none there); on a gold batch the loss mixes in the CE."""
    from warmup_distill_kedro.core.kd.cell import _dual_space_cell
    from warmup_distill_kedro.core.kd.data import STUDENT_SAMPLED
    from warmup_distill_kedro.core.models.encoding import encode_examples

    teacher, student = checkpoints
    examples = _examples()
    encoded, _ = encode_examples(student.tokenizer, examples, 32)
    sampling = {"do_sample": True, "max_new_tokens": 6, "show_progress": False}
    config = _params(
        data={"mode": "on_policy", "lmbda": 1.0, "sampling": sampling}, kd_rate=0.3, fused_head=fused
    )
    if objective == "dskd":
        cell = _dual_space_cell(teacher, student, examples, encoded, config, objective)
    else:
        cell = _token_level_cell(teacher, student, encoded, config, objective)
    sampled = cell.source.batch(0)
    assert STUDENT_SAMPLED in sampled
    with torch.no_grad():
        loss, metrics = cell.loss_fn(cell.model, sampled)
    assert metrics["ce"] > 0.1  # computed (for its metric), not trained on
    assert loss.item() == pytest.approx(0.3 * metrics["kd"], rel=1e-6)
    gold = {k: v for k, v in sampled.items() if k != STUDENT_SAMPLED}
    with torch.no_grad():
        loss, metrics = cell.loss_fn(cell.model, gold)
    assert loss.item() == pytest.approx(0.7 * metrics["ce"] + 0.3 * metrics["kd"], rel=1e-6)
