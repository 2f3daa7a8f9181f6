"""hooks/processes.py, and data parallel on two CPU processes (gloo), launched by `accelerate launch` as on
GPUs.

* the training loop alone: two processes at batch 4 against one at batch 8 (same global batch), same
  loss trajectory and same final weights; only the main process reports; a non-finite loss on one
  process stops both; a saved state resumes on both; the write-back used under FSDP works across
  processes;
* a real `kedro run --pipelines=data,bootstrap` on two processes writes one version of each checkpoint
  and one MLflow run;
* in-process: what a process other than the main one does with the catalog and MLflow
  (`MainProcessWritesHook`, `ProcessLocalDataset`).

The launched processes run this module (`-m tests.hooks.test_processes OUT_DIR`, see `_worker`). Every
launch has a timeout and is killed with its whole process group when it runs past it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.pipeline import Pipeline, node

from tests.helpers import (
    IGNORE_INDEX,
    PROJECT_ROOT,
    TEST_DATA,
    TRAIN_TAGS,
    kedro_run,
    make_context,
    make_project_copy,
    toy_collate,
    toy_examples,
    toy_lm_loss,
    toy_model,
    train,
    training_config,
    uneven_collate,
    uneven_examples,
    version_folders,
    write_raw,
)

CPU_CONFIG = PROJECT_ROOT / "conf" / "accelerate" / "cpu_2proc.yaml"
LAUNCH_TIMEOUT = 180  # seconds; each launch takes 15-40 s on 2 shared cores
STEPS = 5


# --------------------------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(arguments: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """`accelerate launch` on 2 CPU processes; returns the output. Fails (never hangs) past the timeout."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG),
        "--main_process_port", str(_free_port()), *arguments,
    ]  # fmt: skip
    environment = {
        **os.environ,
        **(env or {}),
        "OMP_NUM_THREADS": "1",
        "KEDRO_DISABLE_TELEMETRY": "true",
        "COLUMNS": "400",  # Kedro's rich log handler wraps at the terminal width: keep a message on one line
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }
    process = subprocess.Popen(
        command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"accelerate launch ran past {LAUNCH_TIMEOUT} s (killed):\n{output[-4000:]}")
    assert process.returncode == 0, output[-6000:]
    return output


# ------------------------------------------------------------------------------------- the loop alone
def _loop_config(batch_size: int):
    return training_config(
        max_steps=STEPS,
        batch_size=batch_size,
        gradient_accumulation_steps=2,  # gradients must sync only on the last micro-batch, across processes
        learning_rate=1e-2,
        warmup_steps=1,
        log_every=1,
        eval_every=2,
        checkpoint_every=2,
    )


def _weight_norm(model: torch.nn.Module) -> dict[str, float]:
    return {"weight_norm": float(sum(p.detach().double().norm() for p in model.parameters()))}


def _loss_by_parts(model, batch):
    """The causal LM loss from the model's parts (body, then head), as the fused KD and DSKD losses reach
    into the model: under DDP it must still sync (the loop runs it inside the wrapped forward)."""
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    logits = model.lm_head(hidden)
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )
    return loss, {"nll": loss.item(), "tokens": float((targets != IGNORE_INDEX).sum())}


def _train(batch_size: int, state_folder: Path | None, sink=None, evals=None, seed: int = 0, uneven=False):
    from warmup_distill_kedro.core.training.batches import ShuffledBatches
    from warmup_distill_kedro.core.training.loop import TrainingRun

    def eval_fn(model):
        if evals is not None:
            evals.append(1)
        return _weight_norm(model)

    run = TrainingRun(
        toy_model(seed=seed),
        _loss_by_parts,
        # 64 sequences: 16 batches of 4 or 8 of 8 per epoch, so the 5 steps cross an epoch at the same place
        # for both. Equal lengths, or with `uneven`, response lengths 1 to 6: then the two processes'
        # micro-batches hold different token counts, and only weighting each by its share of the step's
        # tokens makes two processes train as one.
        ShuffledBatches(
            uneven_examples(64) if uneven else toy_examples(64),
            batch_size,
            uneven_collate if uneven else toy_collate,
            seed=1,
        ),
        _loop_config(batch_size),
        eval_fn=eval_fn,
        metrics_sink=sink,
        name="dp",
        state_folder=state_folder,
    )
    return run, run.run()


def _worker(out: Path) -> None:
    """What each launched process runs: three small trainings, results in OUT/rank<r>.{json,pt}."""
    torch.set_num_threads(1)
    import warmup_distill_kedro.core.training.loop as training
    from warmup_distill_kedro.core.training.batches import ShuffledBatches

    sink: list = []
    evals: list = []
    run, result = _train(4, out / "state", sink=lambda m, s: sink.append([dict(m), s]), evals=evals)
    rank = run.process_index
    record = {
        "num_processes": run.num_processes,
        "history": result.history,
        "sink": sink,
        "evals": len(evals),
    }
    torch.save(result.model.state_dict(), out / f"weights{rank}.pt")

    # The saved final state resumes on both processes: nothing left to train, the same weights.
    again, resumed = _train(4, out / "state", seed=9)
    record["resumed_at"] = again.step
    record["resumed_equal"] = all(
        torch.equal(a, b)
        for a, b in zip(resumed.model.state_dict().values(), result.model.state_dict().values(), strict=True)
    )

    # The FSDP / ZeRO-3 path without FSDP: train a copy, write the full weights back on every process.
    training.shards_parameters = lambda accelerator: True
    _, copied = _train(4, None)
    training.shards_parameters = lambda accelerator: False
    torch.save(copied.model.state_dict(), out / f"copied{rank}.pt")

    # Uneven responses: the processes' micro-batches hold different token counts.
    _, uneven = _train(4, None, uneven=True)
    torch.save(uneven.model.state_dict(), out / f"uneven{rank}.pt")

    # A non-finite loss on process 1 only: both processes stop with the error, neither hangs.
    def loss_fn(model, batch):
        loss, metrics = toy_lm_loss(model, batch)
        if rank == 1 and step_counter.step == 1:
            loss = loss * float("nan")
        return loss, metrics

    step_counter = training.TrainingRun(
        toy_model(),
        loss_fn,
        ShuffledBatches(toy_examples(64), 4, toy_collate, 1),
        _loop_config(4),
        name="nan",
    )
    try:
        step_counter.run()
        record["nan_error"] = None
    except training.NonFiniteLossError as error:
        record["nan_error"] = str(error)
    (out / f"rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_two_processes_train_as_one_with_twice_the_batch(tmp_path: Path) -> None:
    started = time.monotonic()
    _launch(["-m", "tests.hooks.test_processes", str(tmp_path)], cwd=PROJECT_ROOT)
    launched = time.monotonic() - started
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2]

    sink: list = []
    single_run, single = _train(8, tmp_path / "single", sink=lambda m, s: sink.append([dict(m), s]))
    assert single_run.num_processes == 1

    # Same losses step by step (mean over processes), same clipping norm, same schedule.
    for rank in ranks:
        train_rows = [h for h in rank["history"] if "loss" in h]
        expected = [h for h in single.history if "loss" in h]
        assert [h["step"] for h in train_rows] == [h["step"] for h in expected] == [1, 2, 3, 4, 5]
        for got, want in zip(train_rows, expected, strict=True):
            for key in ("loss", "nll", "grad_norm", "learning_rate"):
                assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], key)
        assert train_rows[0]["tokens"] == expected[0]["tokens"] / 2  # per process: half the batch
    losses = [h["loss"] for h in single.history if "loss" in h]
    assert losses[0] > losses[-1]  # it trained: the comparison is not between two idle runs

    # Same final weights up to float rounding (which Adam's normalisation magnifies where a gradient is
    # ~0, e.g. the attention key biases: measured differences up to 5e-6); identical on both processes.
    weights = [torch.load(tmp_path / f"weights{r}.pt") for r in (0, 1)]
    for name, value in single.model.state_dict().items():
        assert torch.equal(weights[0][name], weights[1][name]), name
        assert torch.allclose(weights[0][name], value, rtol=1e-4, atol=5e-5), name
    # Control: one process at batch 4 (half the data per step) ends far outside that tolerance.
    _, half = _train(4, None)
    assert max(float((half.model.state_dict()[n] - v).abs().max()) for n, v in weights[0].items()) > 1e-3

    # Every process evaluates (same weights, same numbers); only the main one reports.
    evals = [[h for h in r["history"] if "eval/weight_norm" in h] for r in ranks]
    assert [h["step"] for h in evals[0]] == [2, 4, 5] and evals[0] == evals[1]
    assert [r["evals"] for r in ranks] == [3, 3]
    assert [s for _, s in ranks[0]["sink"]] == [s for _, s in sink] and ranks[1]["sink"] == []
    assert evals[0][-1]["eval/weight_norm"] == pytest.approx(single.final_eval["eval/weight_norm"], rel=1e-6)

    # One state file, written by the main process: 5 steps x 2 micro-batches x 2 processes of the source.
    state = torch.load(tmp_path / "state" / "dp" / "state.pt", weights_only=True)
    assert (state["step"], state["data_position"], state["num_processes"]) == (STEPS, 20, 2)
    assert [r["resumed_at"] for r in ranks] == [STEPS, STEPS] and all(r["resumed_equal"] for r in ranks)

    # Trained as a copy and written back (the FSDP path): the same weights on both processes.
    for rank in (0, 1):
        copied = torch.load(tmp_path / f"copied{rank}.pt")
        for name in copied:
            assert torch.allclose(copied[name], weights[rank][name], atol=1e-6), name

    # With uneven responses too: each micro-batch weighs by its share of the step's tokens, over both
    # processes, so two processes at batch 4 train exactly as one at batch 8.
    _, single_uneven = _train(8, None, uneven=True)
    for rank in (0, 1):
        trained = torch.load(tmp_path / f"uneven{rank}.pt")
        for name, value in single_uneven.model.state_dict().items():
            assert torch.allclose(trained[name], value, rtol=1e-4, atol=5e-5), name
    # (the responses vary in length, so batches of 4 hold different token counts)
    counts = {
        int((uneven_collate(uneven_examples(64)[k : k + 4])["labels"][:, 1:] != IGNORE_INDEX).sum())
        for k in range(0, 64, 4)
    }
    assert len(counts) > 1

    # A NaN on process 1 stops both.
    for rank in ranks:
        assert "non-finite loss on 1 of 2 processes" in rank["nan_error"]
        assert "at optimizer step 2" in rank["nan_error"]
    assert "(this one: nan)" in ranks[1]["nan_error"]
    print(f"launch of 2 processes: {launched:.1f} s")


# ------------------------------------------------------------------------------------- a real kedro run


@pytest.mark.slow
def test_kedro_run_on_two_processes_writes_once_and_tracks_once(tmp_path: Path) -> None:
    project = make_project_copy(tmp_path / "project")
    output = _launch(
        ["-m", "kedro", "run", "--env", "test", "--pipelines", "data,bootstrap"],
        cwd=project,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"},
    )
    assert "data parallel on 2 processes" in output  # the training nodes really ran as one
    assert "process 1 of 2" in output  # and process 1 kept its outputs in memory

    for name in ("teacher_model", "student_model", "student_tokenizer", "teacher_tokenizer"):
        versions = version_folders(project / f"{TEST_DATA}/06_models" / name)
        assert len(versions) == 1, (name, versions)
    for name in ("teacher_sft_metrics.json", "student_sft_metrics.json", "bootstrap_summary.json"):
        assert len(version_folders(project / f"{TEST_DATA}/08_reporting" / name)) == 1, name
    assert not (
        project / f"{TEST_DATA}/09_training_state"
    ).exists()  # the main process cleaned up after saving
    assert not list(project.rglob("*.partial")) and not list(project.rglob(".*.tmp-*"))

    # A client of its own: mlflow.set_tracking_uri would leak the store into later tests (and their env).
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("warmup-distill")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["kedro.node"] for r in children) == ["sft_student", "sft_teacher"]
    teacher = next(r for r in children if r.data.tags["kedro.node"] == "sft_teacher")
    history = client.get_metric_history(teacher.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4, 6]  # logged once, not once per process
    assert all(math.isfinite(m.value) for m in history)
    saved = version_folders(project / f"{TEST_DATA}/06_models/teacher_model")[0].name
    assert parents[0].data.tags["version.save.teacher_model"] == saved


# ----------------------------------------------------------------- in-process: a process other than main
def test_a_process_other_than_the_main_one_writes_nothing_and_tracks_nothing(tmp_path, monkeypatch):
    from warmup_distill_kedro.hooks.mlflow_tracking import MLflowTrackingHook
    from warmup_distill_kedro.hooks.processes import MainProcessWritesHook

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(tmp_path)
    write_raw(tmp_path, [1.0, 2.0])

    tracking = MLflowTrackingHook()
    hook_manager = _create_hook_manager()
    hook_manager.register(tracking)
    hook_manager.register(MainProcessWritesHook())
    context = make_context(tmp_path, tmp_path / "conf", {"enabled": True}, hook_manager)
    hook_manager.hook.after_context_created(context=context)
    seen = {}

    def consume(model_table: pd.DataFrame) -> float:
        seen["table"] = model_table
        return float(model_table["w"].sum())

    pipeline = Pipeline(
        [
            node(train, ["raw", "params:training"], ["model_table", "train_metrics"], tags=TRAIN_TAGS),
            node(consume, "model_table", "total"),
        ]
    )
    kedro_run(hook_manager, context, pipeline)

    assert not tracking.tracking
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "data" / "model_table.csv").exists()  # the main process writes it
    assert seen["table"]["w"].tolist() == pytest.approx([0.01, 0.02])  # handed on in memory


def test_process_local_dataset_keeps_saves_in_memory_and_reads_what_existed(tmp_path, monkeypatch):
    from kedro.io import DataCatalog
    from kedro_datasets.pandas import CSVDataset

    from warmup_distill_kedro.hooks.processes import ProcessLocalDataset, keep_outputs_in_memory

    monkeypatch.setenv("RANK", "1")
    existing = tmp_path / "existing.csv"
    pd.DataFrame({"a": [1]}).to_csv(existing, index=False)
    catalog = DataCatalog.from_config(
        {
            "existing": {"type": "pandas.CSVDataset", "filepath": str(existing)},
            "{name}_out": {"type": "pandas.CSVDataset", "filepath": str(tmp_path / "{name}.csv")},
        }
    )
    catalog["in_memory"] = [1, 2]
    wrapped = keep_outputs_in_memory(catalog, {"existing", "table_out", "in_memory", "params:x", "unknown"})
    assert wrapped == ["existing", "table_out"]  # pattern datasets included; memory and params left alone
    assert isinstance(catalog.get("table_out"), ProcessLocalDataset)
    assert isinstance(catalog.get("table_out").wrapped, CSVDataset)

    assert catalog.load("existing")["a"].tolist() == [1]  # existed before the run: read from disk
    table = pd.DataFrame({"b": [2, 3]})
    catalog.save("table_out", table)
    assert not (tmp_path / "table.csv").exists()
    loaded = catalog.load("table_out")
    assert loaded.equals(table) and loaded is not table  # tables are copied: a node may change its input
    assert catalog.exists("table_out")
    catalog.release("table_out")
    with pytest.raises(Exception, match="released"):
        catalog.load("table_out")


if __name__ == "__main__":
    try:
        _worker(Path(sys.argv[1]))
    finally:  # a process that exits with its group open may abort in gloo's teardown (seen once in CI)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
