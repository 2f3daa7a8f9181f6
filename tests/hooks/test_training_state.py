"""hooks/training_state.py: resume after a crash. In process, the hook gives a training node its state folder,
keyed by the content of its inputs, and deletes it once the node's outputs are saved (keeps it when the node
fails); end to end, `kill -9` a `kedro run` mid-training, run it again, get the uninterrupted result."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import torch
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline, node
from kedro.runner import SequentialRunner
from omegaconf import OmegaConf
from safetensors.torch import load_file

import warmup_distill_kedro
from tests.helpers import (
    TEST_DATA,
    bpe_tokenizer,
    make_project_copy,
    tiny_checkpoint,
    toy_collate,
    toy_examples,
    toy_lm_loss,
    toy_model,
    training_config,
    version_folders,
)
from warmup_distill_kedro import grid
from warmup_distill_kedro.core.training.batches import ShuffledBatches
from warmup_distill_kedro.core.training.context import current_state_folder
from warmup_distill_kedro.core.training.loop import TrainingRun, load_state_file
from warmup_distill_kedro.hooks import training_state
from warmup_distill_kedro.hooks.training_state import (
    STATE_FOLDER,
    TrainingStateHook,
    code_fingerprint,
    input_fingerprint,
    state_folder_name,
)


# -- end to end: kill -9 mid-training, run again ----------------------------------------------------------------
@dataclass(frozen=True)
class Killed:
    """A training node killed mid-training: run alone, on the inputs of the `bootstrapped` project."""

    node: str
    params: dict[str, Any]  # dotted names, as `kedro run --params` takes them
    runs: tuple[str, ...]  # the state sub-folders of its training runs: all saved when it is killed
    model: str  # its checkpoint, under <test data root>/06_models
    resumed: str  # what the rerun logs


STATE_ROOT = Path(TEST_DATA) / STATE_FOLDER  # the test environment's training states
# The hook's state root for an environment whose data_root is data/env (see _run_with_the_hook).
STATE_ROOT_OF_THE_ENV = Path("data/env") / STATE_FOLDER
MAX_STEPS = 20  # the state is saved every 5 steps; the kill comes right after the first save
SAVED_EVERY = {"training.max_steps": MAX_STEPS, "training.checkpoint_every": 5}


def _cell(variant: str, objective: str, **params: Any) -> dict[str, Any]:
    distill = {"variants": f"[{variant}]", "objectives": f"[{objective}]", **SAVED_EVERY, **params}
    return {f"distill.{key}": value for key, value in distill.items()}


KILLED = {
    "sft_student": Killed(
        "sft_student", {f"bootstrap.student.{key}": value for key, value in SAVED_EVERY.items()},
        ("sft_student",), "student_model", "sft student: resuming from step",
    ),
    # DistiLLM's replay buffer: full (2 sampled batches of 4) before the first save, replayed after it.
    "adaptive distill cell": Killed(
        f"vanilla.fkl.{grid.node_name('distill', 'vanilla.fkl')}",
        _cell("vanilla", "fkl", **{"data.mode": "adaptive", "data.initial_threshold": 1.0, "data.capacity": 8,
                                   "data.loss_eps": 0.0, "training.eval_every": 5}),
        ("distill_vanilla_fkl",), "distilled/vanilla.fkl.student", "distill vanilla/fkl: resuming from step",
    ),
    # Two runs in one node: the projectors pre-trained (finished when killed), then the cell.
    "dskd cell with projector pre-training": Killed(
        f"vanilla.dskd.{grid.node_name('distill', 'vanilla.dskd')}", _cell("vanilla", "dskd", **{"options.dskd.pretrain_steps": 5}),
        ("dskd_projectors", "distill_vanilla_dskd"), "distilled/vanilla.dskd.student",
        "distill vanilla/dskd: resuming from step",
    ),
}  # fmt: skip


def _dotted(params: dict[str, Any]) -> list[str]:
    return [f"{key}={value}" for key, value in params.items()]


def _command(case: Killed) -> list[str]:
    return [sys.executable, "-m", "kedro", "run", "--env", "test", "--nodes", case.node,
            "--params", ",".join(_dotted(case.params))]  # fmt: skip


def _environment(project: Path) -> dict[str, str]:
    return {
        **os.environ,
        "KEDRO_DISABLE_TELEMETRY": "true",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        "COLUMNS": "400",  # Kedro's rich log handler wraps at the terminal width: keep a message on one line
        "OMP_NUM_THREADS": "1",  # one thread, as in this process (conftest): the same sums, the same weights
    }


def _run(command: list[str], project: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=project, env=_environment(project), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _run_here(project: Path, params: dict[str, Any] | None = None, **run: Any) -> None:
    """A run in this process (no interpreter to start): the uninterrupted runs the killed ones end as."""
    bootstrap_project(project)
    runtime_params = OmegaConf.to_container(OmegaConf.from_dotlist(_dotted(params or {})))
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(project)
            for name, value in _environment(project).items():
                patch.setenv(name, value)
            with KedroSession.create(project, env="test", runtime_params=runtime_params) as session:
                session.run(**run)
    finally:
        grid.use_parameters({})  # the default grid again for the tests that follow


def _weights(project: Path, model: str) -> dict[str, torch.Tensor]:
    """The newest version of a checkpoint's weights."""
    newest = version_folders(project / TEST_DATA / "06_models" / model)[-1]
    return load_file(newest / Path(model).name / "model.safetensors")


def _versions(project: Path, model: str) -> list[Path]:
    folder = project / TEST_DATA / "06_models" / model
    return version_folders(folder) if folder.exists() else []


def _state_files(project: Path, case: Killed) -> list[Path]:
    """The state file of each of the node's runs, once all of them are saved in one folder."""
    for folder in (project / STATE_ROOT / case.node).glob("*"):
        files = [folder / run / "state.pt" for run in case.runs]
        if all(file.is_file() for file in files):
            return files
    return []


@pytest.fixture(scope="module")
def bootstrapped(tmp_path_factory) -> Path:
    """A project with the inputs of every killed node (splits, tokenizers, teacher, KD examples; the student
    for the cells): the start of every kill test, each on copies."""
    project = make_project_copy(tmp_path_factory.mktemp("bootstrapped"))
    _run_here(project, to_nodes=["prepare_kd_examples", "sft_student"])
    return project


@pytest.mark.slow
@pytest.mark.parametrize("case", list(KILLED.values()), ids=list(KILLED))
def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(bootstrapped, tmp_path, case) -> None:
    straight = shutil.copytree(bootstrapped, tmp_path / "straight")
    _run_here(straight, case.params, node_names=[case.node])
    assert not (straight / STATE_ROOT).exists()  # finished nodes leave no state behind

    crashed = shutil.copytree(bootstrapped, tmp_path / "crashed")
    models_before = _versions(crashed, case.model)
    process = subprocess.Popen(
        _command(case), cwd=crashed, env=_environment(crashed), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not _state_files(crashed, case) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # kill -9, mid-training
    assert process.wait() == -signal.SIGKILL, "the run ended before it was killed: give it more steps"
    *finished, state_file = _state_files(crashed, case)
    saved = load_state_file(state_file)
    assert 0 < saved["step"] < MAX_STEPS
    assert [load_state_file(file)["step"] for file in finished] == [5] * len(finished)  # pre-training done
    if saved["data"] is not None:  # the adaptive source: its buffer full, saved as plain values
        assert len(saved["data"]["buffer"]) == 8
    assert _versions(crashed, case.model) == models_before  # no model saved

    rerun = _run(_command(case), crashed)
    assert case.resumed in rerun.stderr + rerun.stdout
    assert not (crashed / STATE_ROOT).exists()
    expected, got = _weights(straight, case.model), _weights(crashed, case.model)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name  # identical on CPU, not merely close
    if ".distill_" in case.node:  # the cell's data: the same batches drawn, replayed and sampled
        metrics = [_distill_metrics(project, case) for project in (straight, crashed)]
        assert metrics[0] == metrics[1]


def _distill_metrics(project: Path, case: Killed) -> dict:
    cell = case.node.split(".distill_")[0]
    folder = project / TEST_DATA / f"08_reporting/distill/{cell}.distill_metrics.json"
    metrics = json.loads((version_folders(folder)[-1] / folder.name).read_text())
    history = [{k: v for k, v in record.items() if k != "steps_per_second"} for record in metrics["history"]]
    return {"history": history, **{k: v for k, v in metrics.items() if k.startswith("batches_")}}


def test_the_fingerprint_follows_content_not_identity() -> None:
    tokenizer = bpe_tokenizer(["a b c 1 2 3"] * 20, 270)

    def checkpoint(seed: int):
        return tiny_checkpoint(tokenizer, seed=seed)

    base = {"student": checkpoint(0), "params:x": {"lr": 0.1}}
    assert input_fingerprint(base) == input_fingerprint({"student": checkpoint(0), "params:x": {"lr": 0.1}})
    assert input_fingerprint(base) != input_fingerprint({**base, "student": checkpoint(1)})
    assert input_fingerprint(base) != input_fingerprint({**base, "params:x": {"lr": 0.2}})


# -- the hook, in process ---------------------------------------------------------------------------------------
TABLE = pd.DataFrame({"a": [1, 2]})
PARAMS = {"lr": 0.1}


def _run_with_the_hook(project_path: Path, fail: bool = False, seen: dict | None = None) -> dict:
    """A `training` node (a toy run saving its state every step) and an untagged one, run with the hook;
    what the nodes saw goes into `seen`."""
    seen = {} if seen is None else seen

    def train_toy(table: pd.DataFrame, params: dict) -> tuple[pd.DataFrame, dict]:
        seen["folder"] = current_state_folder()
        run = TrainingRun(
            toy_model(),
            toy_lm_loss,
            ShuffledBatches(toy_examples(8), 4, toy_collate, seed=0),
            training_config(max_steps=2, checkpoint_every=1),
            name="toy",
        )
        run.run()
        seen["state_file"] = run.state_file
        if fail:
            raise RuntimeError("the node failed after training")
        return table.assign(w=params["lr"]), {"steps": 2}

    def count(table: pd.DataFrame) -> int:
        seen["untagged_folder"] = current_state_folder()
        return len(table)

    hook = TrainingStateHook()
    config_loader = {"globals": {"data_root": "data/env"}}
    hook.after_context_created(SimpleNamespace(project_path=project_path, config_loader=config_loader))
    hook_manager = _create_hook_manager()
    hook_manager.register(hook)
    pipeline = Pipeline(
        [
            node(train_toy, ["table", "params:x"], ["out", "metrics"], name="train_toy", tags=["training"]),
            node(count, "table", "n_rows", name="count"),
        ]
    )
    catalog = DataCatalog({"table": MemoryDataset(TABLE), "params:x": MemoryDataset(PARAMS)})
    try:
        SequentialRunner().run(pipeline, catalog, hook_manager)
    finally:
        seen["after"] = current_state_folder()
    return seen


def test_a_training_node_gets_a_state_folder_by_input_content_deleted_once_its_outputs_are_saved(tmp_path):
    seen = _run_with_the_hook(tmp_path)
    expected = (
        tmp_path
        / STATE_ROOT_OF_THE_ENV
        / "train_toy"
        / state_folder_name({"table": TABLE, "params:x": PARAMS})
    )
    assert seen["folder"] == expected
    assert seen["state_file"] == expected / "toy" / "state.pt"  # the loop saved its state there...
    assert not (tmp_path / STATE_ROOT_OF_THE_ENV).exists()  # ...and with both outputs saved, nothing is left
    assert seen["untagged_folder"] is None  # a node not tagged `training` gets no folder
    assert seen["after"] is None


def test_the_state_folder_follows_the_code(tmp_path):
    """A fix to a loss or to the loop changes the folder: a rerun starts over instead of continuing from
    state the old code trained."""
    package = Path(warmup_distill_kedro.__file__).parent
    copy = tmp_path / "warmup_distill_kedro"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert code_fingerprint(copy) == code_fingerprint()  # the same sources: the same code
    loss = copy / "core" / "kd" / "losses.py"
    loss.write_text(loss.read_text() + "\n# a fix\n")
    assert code_fingerprint(copy) != code_fingerprint()
    assert state_folder_name({"params:x": PARAMS}).startswith(f"{code_fingerprint()}-")


def test_a_state_of_other_code_is_deleted_and_one_of_other_inputs_is_kept_and_named(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(training_state, "code_fingerprint", lambda: "0ddc0de0")
    with pytest.raises(RuntimeError, match="the node failed after training"):
        _run_with_the_hook(tmp_path, fail=True)  # a crash under the old code
    [old_state] = (tmp_path / STATE_ROOT_OF_THE_ENV).glob("train_toy/0ddc0de0-*/toy/state.pt")
    other_inputs = tmp_path / STATE_ROOT_OF_THE_ENV / "train_toy" / f"{code_fingerprint()}-0123456789abcdef"
    (other_inputs / "toy").mkdir(parents=True)
    shutil.copy(old_state, other_inputs / "toy" / "state.pt")  # a crash of this code with other inputs
    monkeypatch.undo()

    seen: dict = {}
    with caplog.at_level(logging.INFO), pytest.raises(RuntimeError, match="the node failed"):
        _run_with_the_hook(tmp_path, fail=True, seen=seen)  # the new code: starts over, and says why
    assert seen["folder"].name == state_folder_name({"table": TABLE, "params:x": PARAMS})
    assert not old_state.parent.parent.exists()  # other code: deleted
    assert (other_inputs / "toy" / "state.pt").is_file()  # other inputs: kept
    log = caplog.text
    assert (
        f"not resuming the training state in {old_state.parent.parent}: it was written by other code" in log
    )
    assert f"not resuming the training state(s) {other_inputs.name}" in log
    assert "their inputs or parameters differ" in log
    assert "resuming from step" not in log  # trained from the start


def test_a_failed_training_node_keeps_its_state_for_the_next_run(tmp_path):
    with pytest.raises(RuntimeError, match="the node failed after training"):
        _run_with_the_hook(tmp_path, fail=True)
    [state_file] = (tmp_path / STATE_ROOT_OF_THE_ENV).glob("train_toy/*/toy/state.pt")
    assert torch.load(state_file, weights_only=True)["step"] == 2
    assert current_state_folder() is None
