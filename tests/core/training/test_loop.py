"""core/training/loop.py: the shared training loop: schedule, metrics, accumulation, failure on NaN, exact
resume (from its state dict and from its state folder), gradient checkpointing, the copy trained under
FSDP, mixed precision. The toy model and data (tests.helpers) keep the loop apart from the encoding."""

from __future__ import annotations

import copy
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import (
    IGNORE_INDEX,
    DiskEvents,
    assert_weights_close,
    toy_collate,
    toy_examples,
    toy_lm_loss,
    toy_model,
    training_config,
    uneven_collate,
    uneven_examples,
)
from warmup_distill_kedro.core.training.batches import ShuffledBatches
from warmup_distill_kedro.core.training.context import set_state_folder
from warmup_distill_kedro.core.training.loop import NonFiniteLossError, TrainingRun, train, warmup_cosine

torch.set_num_threads(1)


# -- schedule ---------------------------------------------------------------------------------------------
def test_warmup_cosine_shape():
    warmup, max_steps, floor = 4, 20, 0.1
    values = [warmup_cosine(s, warmup, max_steps, floor) for s in range(max_steps + 3)]
    assert values[:warmup] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[warmup] == pytest.approx(1.0)  # the first step after warmup is at the peak
    after = values[warmup : max_steps + 1]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    assert after[1] < 1.0
    mid = warmup + (max_steps - warmup) // 2
    assert values[mid] == pytest.approx(floor + (1 - floor) * 0.5)
    assert values[max_steps] == pytest.approx(floor)
    assert values[max_steps + 2] == pytest.approx(floor)  # stays at the floor past the budget


def test_warmup_cosine_without_warmup():
    assert warmup_cosine(0, 0, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 0, 10, 0.0) == pytest.approx(0.0)
    assert warmup_cosine(5, 0, 10, 0.2) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 2)))


# -- loop -------------------------------------------------------------------------------------------------
def test_train_lowers_loss_and_reports_to_sink():
    config = training_config(max_steps=25, log_every=5, learning_rate=2e-2, warmup_steps=3, min_lr_ratio=0.1)
    data = ShuffledBatches(toy_examples(8), config.batch_size, toy_collate, seed=0)
    calls: list[tuple[dict[str, float], int]] = []
    result = train(
        toy_model(),
        toy_lm_loss,
        data,
        config,
        eval_fn=lambda model: {"score": 0.5, "n": 3},
        metrics_sink=lambda metrics, step: calls.append((dict(metrics), step)),
    )
    assert result.steps == config.max_steps
    train_calls = [(m, s) for m, s in calls if "loss" in m]
    eval_calls = [(m, s) for m, s in calls if any(k.startswith("eval/") for k in m)]
    assert [s for _, s in train_calls] == [5, 10, 15, 20, 25]
    for metrics, _ in train_calls:
        assert {"loss", "learning_rate", "grad_norm", "nll", "tokens"} <= set(metrics)
        assert math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    assert eval_calls == [({"eval/score": 0.5, "eval/n": 3.0}, 25)]  # eval_every=0: only at the end
    assert result.final_eval == {"eval/score": 0.5, "eval/n": 3.0}
    # learning_rate is the rate each step used, averaged over the logging window.
    expected = [config.learning_rate * warmup_cosine(s, 3, 25, 0.1) for s in range(25)]
    for metrics, step in train_calls:
        assert metrics["learning_rate"] == pytest.approx(sum(expected[step - 5 : step]) / 5)
    assert train_calls[0][0]["loss"] > train_calls[-1][0]["loss"] + 0.5
    assert [r["step"] for r in result.history] == [5, 10, 15, 20, 25, 25]
    assert result.model is not None


def test_log_every_and_eval_every():
    config = training_config(max_steps=7, log_every=3, eval_every=2)
    data = ShuffledBatches(toy_examples(8), config.batch_size, toy_collate, seed=0)
    calls: list[tuple[dict[str, float], int]] = []
    train(
        toy_model(),
        toy_lm_loss,
        data,
        config,
        eval_fn=lambda model: {"x": float(model.training)},
        metrics_sink=lambda metrics, step: calls.append((dict(metrics), step)),
    )
    assert [s for m, s in calls if "loss" in m] == [3, 6, 7]  # every log_every steps and the last one
    evals = [(m, s) for m, s in calls if "eval/x" in m]
    assert [s for _, s in evals] == [2, 4, 6, 7]
    assert all(m["eval/x"] == 0.0 for m, _ in evals)  # evaluated in eval mode


def _first_step_gradients(
    batch_size: int, accumulation: int
) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    config = training_config(
        max_steps=1,
        batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_grad_norm=None,
        learning_rate=1e-3,
    )
    data = ShuffledBatches(toy_examples(8), batch_size, toy_collate, seed=3)
    model = toy_model(seed=5)
    run = TrainingRun(model, toy_lm_loss, data, config)
    run.run()
    beta1 = run.optimizer.param_groups[0]["betas"][0]
    # After AdamW's first step, exp_avg == (1 - beta1) * gradient: the gradient the step used.
    grads = {name: run.optimizer.state[p]["exp_avg"] / (1 - beta1) for name, p in model.named_parameters()}
    return grads, model


def test_gradient_accumulation_matches_big_batch():
    big_grads, big_model = _first_step_gradients(batch_size=8, accumulation=1)
    acc_grads, acc_model = _first_step_gradients(batch_size=4, accumulation=2)
    half_grads, _ = _first_step_gradients(batch_size=4, accumulation=1)
    assert big_grads.keys() == acc_grads.keys()
    for name in big_grads:
        assert big_grads[name].abs().max() > 0, name
        assert torch.allclose(acc_grads[name], big_grads[name], rtol=1e-4, atol=1e-7), name
    assert_weights_close(acc_model, big_model, atol=1e-6)
    # Control: half the data gives another gradient, so the comparison above has teeth.
    assert not all(torch.allclose(half_grads[n], big_grads[n], rtol=1e-4, atol=1e-7) for n in big_grads)


def test_non_finite_loss_raises_with_step():
    calls = {"n": 0}

    def loss_fn(model, batch):
        loss, metrics = toy_lm_loss(model, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), metrics

    config = training_config(max_steps=5)
    data = ShuffledBatches(toy_examples(8), config.batch_size, toy_collate, seed=0)
    with pytest.raises(NonFiniteLossError, match="optimizer step 3"):
        train(toy_model(), loss_fn, data, config, name="bootstrap")

    def inf_loss(model, batch):
        return torch.tensor(float("inf"), requires_grad=True), {}

    with pytest.raises(NonFiniteLossError, match="step 1"):
        train(toy_model(), inf_loss, data, config)


class _Interrupt(Exception):
    pass


def _noisy_loss(model, batch):
    """Draws from the global torch, numpy and python RNGs, so an exact resume needs all three restored."""
    loss, metrics = toy_lm_loss(model, batch)
    return loss * (1 + 0.5 * torch.rand(()) + 0.1 * np.random.rand() + 0.1 * random.random()), metrics


def test_resume_from_state_dict_matches_uninterrupted_run():
    config = training_config(
        max_steps=6, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.01, learning_rate=2e-2
    )

    def data():
        return ShuffledBatches(toy_examples(12), config.batch_size, toy_collate, seed=1)

    straight = TrainingRun(toy_model(seed=0), _noisy_loss, data(), config).run()

    saved: dict = {}
    first = TrainingRun(toy_model(seed=0), _noisy_loss, data(), config)

    def interrupt_at_3(metrics, step):
        if step == 3:
            saved.update(copy.deepcopy(first.state_dict()))
            raise _Interrupt

    first.metrics_sink = interrupt_at_3
    with pytest.raises(_Interrupt):
        first.run()
    assert saved["step"] == 3 and saved["data_position"] == 3

    resumed_run = TrainingRun(
        toy_model(seed=99), _noisy_loss, data(), config
    )  # other init: load must overwrite
    resumed_run.load_state_dict(saved)
    assert resumed_run.step == 3
    resumed = resumed_run.run()

    assert resumed.steps == straight.steps == 6
    assert_weights_close(resumed.model, straight.model, atol=1e-6)
    assert [r["step"] for r in resumed.history] == [r["step"] for r in straight.history]
    for a, b in zip(resumed.history, straight.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["learning_rate"] == pytest.approx(b["learning_rate"])
    # Not a vacuous comparison: training moved the weights away from the start.
    start = toy_model(seed=0)
    assert not torch.allclose(start.model.embed_tokens.weight, straight.model.model.embed_tokens.weight)


# -- resuming from the state folder ------------------------------------------------------------------------
def _eval(model):
    return {"weight_norm": float(sum(p.norm() for p in model.parameters()))}


def test_a_crashed_run_resumes_from_its_state_folder_and_ends_as_an_uninterrupted_one(tmp_path):
    config = training_config(
        max_steps=7, checkpoint_every=2, eval_every=3, learning_rate=2e-2, warmup_steps=1
    )

    def run(folder, sink=None, seed=0):
        data = ShuffledBatches(toy_examples(12), config.batch_size, toy_collate, seed=1)
        return TrainingRun(
            toy_model(seed),
            _noisy_loss,
            data,
            config,
            eval_fn=_eval,
            metrics_sink=sink,
            state_folder=folder,
            name="sft student",
        )

    straight = run(tmp_path / "straight").run()

    def crash_at_5(metrics, step):
        if step == 5 and "loss" in metrics:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run(tmp_path / "crashed", crash_at_5).run()
    state_file = tmp_path / "crashed" / "sft_student" / "state.pt"
    assert torch.load(state_file, weights_only=True)["step"] == 4  # the last multiple of checkpoint_every

    resumed = run(tmp_path / "crashed", seed=99).run()  # another init: the state must overwrite it
    assert resumed.steps == straight.steps == 7
    assert_weights_close(resumed.model, straight.model, atol=1e-6)
    assert [r["step"] for r in resumed.history] == [r["step"] for r in straight.history]
    assert resumed.final_eval == pytest.approx(straight.final_eval)

    # The final state is saved too: a crash after training (while saving outputs) retrains nothing.
    again = run(tmp_path / "crashed", seed=99)
    assert again.resume() and again.step == 7
    after = again.run()
    assert after.history == resumed.history  # no step and no evaluation repeated
    assert_weights_close(after.model, straight.model, atol=1e-6)


def test_the_state_folder_comes_from_the_context_and_can_be_switched_off(tmp_path):
    config = training_config(max_steps=2, checkpoint_every=1)
    data = ShuffledBatches(toy_examples(8), config.batch_size, toy_collate, seed=0)
    set_state_folder(tmp_path)
    try:
        TrainingRun(toy_model(), toy_lm_loss, data, config, name="warmup").run()
    finally:
        set_state_folder(None)
    assert (tmp_path / "warmup" / "state.pt").is_file()
    assert TrainingRun(toy_model(), toy_lm_loss, data, config).state_file is None
    never = TrainingRun(
        toy_model(),
        toy_lm_loss,
        data,
        training_config(max_steps=2, checkpoint_every=0),
        state_folder=tmp_path / "x",
    )
    never.run()
    assert not (tmp_path / "x").exists()


def test_the_state_is_on_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    disk = DiskEvents(monkeypatch)
    data = ShuffledBatches(toy_examples(8), 4, toy_collate, seed=0)
    config = training_config(max_steps=1, checkpoint_every=1)
    TrainingRun(toy_model(), toy_lm_loss, data, config, state_folder=tmp_path, name="warmup").run()
    partial, final, renamed_at = disk.the_rename()
    assert final == str(tmp_path / "warmup" / "state.pt")
    assert Path(partial).parent == tmp_path / "warmup" and Path(partial).name.endswith(".partial")
    assert disk.synced(partial, before=renamed_at)
    assert disk.synced(tmp_path / "warmup", after=renamed_at)


class _RunsCode:
    """Unpickling it runs code the file chose (here: it writes a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_state_file_holding_an_arbitrary_object_is_refused_without_running_it(tmp_path):
    """Resuming is automatic and the state folder may be writable by others: the file is read with
    weights_only, and anything but tensors and plain values stops the run with the file named."""
    config = training_config(max_steps=2, checkpoint_every=1)
    data = ShuffledBatches(toy_examples(8), 4, toy_collate, seed=0)
    TrainingRun(toy_model(), toy_lm_loss, data, config, state_folder=tmp_path, name="sft student").run()
    state_file = tmp_path / "sft_student" / "state.pt"
    state = torch.load(state_file, weights_only=True)  # what save_state writes loads safely
    marker = tmp_path / "code_ran"
    torch.save({**state, "history": [_RunsCode(marker)]}, state_file)

    run = TrainingRun(toy_model(), toy_lm_loss, data, config, state_folder=tmp_path, name="sft student")
    message = rf"sft student: refusing to resume from the training state {re.escape(str(state_file))}"
    with pytest.raises(RuntimeError, match=rf"{message}: .*\(it names exec\).*delete the file"):
        run.run()
    assert not marker.exists()


def test_a_state_beyond_the_budget_is_refused(tmp_path):
    data = ShuffledBatches(toy_examples(8), 4, toy_collate, seed=0)
    TrainingRun(
        toy_model(),
        toy_lm_loss,
        data,
        training_config(max_steps=3, checkpoint_every=1),
        state_folder=tmp_path,
    ).run()
    shorter = TrainingRun(toy_model(), toy_lm_loss, data, training_config(max_steps=2), state_folder=tmp_path)
    with pytest.raises(ValueError, match=r"step 3, beyond max_steps 2.*delete it"):
        shorter.run()


# -- gradient checkpointing ----------------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_training_and_is_switched_off_after():
    grads_plain, plain = _first_step_gradients(batch_size=4, accumulation=2)
    config = training_config(
        max_steps=1,
        batch_size=4,
        gradient_accumulation_steps=2,
        max_grad_norm=None,
        learning_rate=1e-3,
        gradient_checkpointing=True,
    )
    model = toy_model(seed=5)
    run = TrainingRun(model, toy_lm_loss, ShuffledBatches(toy_examples(8), 4, toy_collate, seed=3), config)
    assert model.is_activation_checkpointing
    result = run.run()
    beta1 = run.optimizer.param_groups[0]["betas"][0]
    for name, p in model.named_parameters():
        grad = run.optimizer.state[p]["exp_avg"] / (1 - beta1)
        assert torch.allclose(grad, grads_plain[name], rtol=1e-5, atol=1e-8), name
    assert_weights_close(result.model, plain, atol=1e-7)
    assert not result.model.is_activation_checkpointing  # the model leaves the loop as it came


def test_gradient_checkpointing_on_a_model_without_it_names_the_parameter():
    module = torch.nn.Linear(4, 4)
    data = ShuffledBatches([[0.0] * 4] * 8, 4, lambda b: {"x": torch.tensor(b)}, seed=0)
    with pytest.raises(ValueError, match=r"training\.gradient_checkpointing.*Linear"):
        TrainingRun(
            module, lambda m, b: (m(b["x"]).sum(), {}), data, training_config(gradient_checkpointing=True)
        )


# -- the copy trained under FSDP / ZeRO-3 ---------------------------------------------------------------------
def test_a_sharded_run_trains_a_copy_and_writes_the_weights_back(monkeypatch):
    """Under FSDP the loop trains a copy and writes its full weights into the caller's model. Without a GPU
    FSDP cannot run: here the copy is trained as a plain model (what the write-back sees is the same),
    with two parameter groups at their own rates, which must follow the copy."""
    import warmup_distill_kedro.core.training.loop as training

    config = training_config(max_steps=3, learning_rate=1e-2, eval_every=2)

    def run(shards: bool):
        monkeypatch.setattr(training, "shards_parameters", lambda accelerator: shards)
        model = toy_model(seed=2)
        groups = [
            {"params": list(model.model.layers.parameters()), "lr": 5e-2},
            {"params": [p for n, p in model.named_parameters() if ".layers." not in n]},
        ]
        seen = []
        result = TrainingRun(
            model,
            toy_lm_loss,
            ShuffledBatches(toy_examples(12), 4, toy_collate, seed=1),
            config,
            parameter_groups=groups,
            # evaluates the caller's model, as the distill node's eval_fn does (it ignores its argument)
            eval_fn=lambda _: seen.append(float(model.lm_head.weight.sum())) or {"x": seen[-1]},
            state_folder=None,
        ).run()
        return model, result, seen

    plain_model, plain, plain_seen = run(shards=False)
    caller, sharded, sharded_seen = run(shards=True)
    assert sharded.model is caller  # the caller's object, holding the trained weights
    assert_weights_close(caller, plain_model, atol=1e-7)
    assert sharded_seen == pytest.approx(plain_seen)  # each evaluation saw the weights of its step
    for a, b in zip(sharded.history, plain.history, strict=True):
        assert {k: v for k, v in a.items() if k != "steps_per_second"} == pytest.approx(
            {k: v for k, v in b.items() if k != "steps_per_second"}
        )


def test_runs_with_different_mixed_precision_share_one_process():
    """A kedro run trains several nodes in one process; each may set its own training.mixed_precision."""
    for precision in ("no", "bf16", "no"):
        config = training_config(max_steps=1, mixed_precision=precision)
        data = ShuffledBatches(toy_examples(8), config.batch_size, toy_collate, seed=0)
        run = TrainingRun(toy_model(), toy_lm_loss, data, config, name=precision)
        assert run.accelerator.mixed_precision == precision
        assert run.run().steps == 1


# -- the loss of a step does not depend on how its batch is cut -------------------------------------------------
class _Fixed:
    """The same 32 examples, cut into micro-batches of `size` in order (position k: examples k*size ...)."""

    def __init__(self, examples, size):
        self.examples, self.size = examples, size

    def batch(self, position):
        return uneven_collate(self.examples[position * self.size : (position + 1) * self.size])


def _first_step_gradient(size: int, accumulation: int) -> list[torch.Tensor]:
    model = toy_model(seed=2)
    run = TrainingRun(
        model,
        toy_lm_loss,
        _Fixed(uneven_examples(32), size),
        training_config(
            max_steps=1, batch_size=size, gradient_accumulation_steps=accumulation, max_grad_norm=None
        ),
    )
    gradients: list[torch.Tensor] = []
    inner = run.optimizer.optimizer if hasattr(run.optimizer, "optimizer") else run.optimizer
    inner.register_step_pre_hook(
        lambda optimizer, args, kwargs: gradients.extend(p.grad.clone() for p in run.module.parameters())
    )
    run.run()
    return gradients


def test_one_step_of_32_sequences_and_of_4_micro_batches_of_8_give_the_same_gradient():
    """The step's loss is the token mean over all 32 sequences however they are cut: each micro-batch's
    token mean weighs by its share of the step's tokens (a plain mean of micro-batch means would weigh a
    micro-batch of short responses as much as one of long ones)."""
    whole = _first_step_gradient(32, 1)
    cut = _first_step_gradient(8, 4)
    assert len(whole) == len(cut) > 0
    for a, b in zip(whole, cut, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # The examples really are uneven: the micro-batches hold different token counts.
    counts = [
        int((uneven_collate(uneven_examples(32)[k * 8 : (k + 1) * 8])["labels"][:, 1:] != IGNORE_INDEX).sum())
        for k in range(4)
    ]
    assert len(set(counts)) > 1
