"""distill.fused_head: a token-level cell gives the same loss, metrics, gradients and training run from the
last hidden states and the heads as from the full logits; the parameter is refused where it cannot apply."""

from __future__ import annotations

import random

import pandas as pd
import pytest
import torch

from warmup_distill_kedro.core.kd.cell import _token_level_cell
from warmup_distill_kedro.core.kd.cell import distill_cell as distill_student
from warmup_distill_kedro.core.kd.fused import last_hidden_state, lm_head
from warmup_distill_kedro.core.models.modeling import Checkpoint, ModelSize, build_model
from warmup_distill_kedro.core.models.tokenization import TokenizerConfig, train_bpe_tokenizer
from warmup_distill_kedro.pipelines.distill.params import DistillParams

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
    tokenizer = train_bpe_tokenizer(
        (examples["prompt"] + examples["response"]).tolist(), TokenizerConfig(vocab_size=300, min_frequency=1)
    )
    teacher_size = ModelSize(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48)
    # The student ties its head to its input embeddings (the default): one parameter, two gradient paths.
    student_size = ModelSize(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    teacher = Checkpoint(build_model(teacher_size, tokenizer, seed=1), tokenizer, {})
    student = Checkpoint(build_model(student_size, tokenizer, seed=2), tokenizer, {})
    return teacher, student


def _params(objective: str = "fkl", **changes) -> DistillParams:
    training = {"max_steps": 2, "batch_size": 6, "learning_rate": 1e-2, "show_progress": False}
    return DistillParams(
        objectives=[objective],
        chunk_size=5,
        max_length=32,
        validation_examples=6,
        data={"mode": "off_policy"},
        training=training,
        **changes,
    )


@pytest.mark.parametrize(("objective", "kd_rate"), [("fkl", 0.5), ("akl", 0.5), ("js", 1.0)])
def test_a_fused_cell_gives_the_same_loss_metrics_and_gradients(checkpoints, objective, kd_rate):
    from warmup_distill_kedro.core.models.encoding import encode_examples

    teacher, student = checkpoints
    encoded, _ = encode_examples(student.tokenizer, _examples(), 32)
    results = []
    for fused in (False, True):
        cell = _token_level_cell(
            teacher, student, encoded, _params(objective, fused_head=fused, kd_rate=kd_rate), objective
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
        distill_student(
            teacher, student, examples, examples, _params("srkl", fused_head=fused), "vanilla", "srkl"
        )
        for fused in (False, True)
    ]
    (plain, plain_metrics), (fused, fused_metrics) = trained
    assert fused_metrics["final_validation_nll"] == pytest.approx(
        plain_metrics["final_validation_nll"], rel=1e-4
    )
    for (name, p), q in zip(plain.model.named_parameters(), fused.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


def test_last_hidden_state_is_what_the_head_reads(checkpoints):
    teacher, _ = checkpoints
    input_ids = torch.tensor([[5, 9, 11, 3], [7, 7, 2, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        logits = teacher.model(input_ids=input_ids, attention_mask=attention_mask).logits
        hidden = last_hidden_state(teacher.model, input_ids, attention_mask)
    torch.testing.assert_close(lm_head(teacher.model)(hidden), logits)


def test_a_head_with_logit_post_processing_is_refused(checkpoints):
    _, student = checkpoints
    model = student.model
    model.config.final_logit_softcapping = 30.0
    try:
        with pytest.raises(ValueError, match=r"final_logit_softcapping.*fused_head: false"):
            lm_head(model)
    finally:
        del model.config.final_logit_softcapping


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"chunk_size": None}, "fused_head: true needs chunk_size"),
        (
            {"objectives": ["dskd", "sft"]},
            r"fused_head: true applies to the token-level objectives.*has none",
        ),
    ],
)
def test_fused_head_is_refused_where_it_cannot_apply(changes, says):
    fields = {
        "objectives": ["fkl"],
        "chunk_size": 8,
        "fused_head": True,
        "training": {"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3},
    }
    with pytest.raises(ValueError, match=says):
        DistillParams(**{**fields, **changes})


def test_fused_head_is_accepted_beside_dskd_and_sft_cells():
    params = DistillParams(
        objectives=["fkl", "dskd", "sft"],
        chunk_size=8,
        fused_head=True,
        training={"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3},
    )
    assert params.fused_head
