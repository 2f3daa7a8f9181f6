"""hooks/training_state.py: resume after a crash. In process, the hook gives a training node its state folder,
keyed by the content of its inputs, and deletes it once the node's outputs are saved (keeps it when the node
fails); end to end, `kill -9` a `kedro run` mid-training, run it again, get the uninterrupted result."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline, node
from kedro.runner import SequentialRunner
from safetensors.torch import load_file

import warmup_distill_kedro
from tests.helpers import (
    bpe_tokenizer,
    make_project_copy,
    tiny_checkpoint,
    toy_collate,
    toy_examples,
    toy_lm_loss,
    toy_model,
    training_config,
)
from warmup_distill_kedro.core.training.batches import ShuffledBatches
from warmup_distill_kedro.core.training.context import current_state_folder
from warmup_distill_kedro.core.training.loop import TrainingRun
from warmup_distill_kedro.hooks import training_state
from warmup_distill_kedro.hooks.training_state import (
    STATE_ROOT,
    TrainingStateHook,
    code_fingerprint,
    input_fingerprint,
    state_folder_name,
)

STUDENT_STEPS = 800
COMMAND = [
    sys.executable, "-m", "kedro", "run", "--env", "test", "--pipelines", "data,bootstrap",
    "--params", f"bootstrap.student.training.max_steps={STUDENT_STEPS},bootstrap.student.training.checkpoint_every=25",
]  # fmt: skip


def _environment(project: Path) -> dict[str, str]:
    return {
        **os.environ,
        "KEDRO_DISABLE_TELEMETRY": "true",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
    }


def _run(project: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        COMMAND, cwd=project, env=_environment(project), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _student_weights(project: Path) -> dict[str, torch.Tensor]:
    [version] = (project / "data/06_models/student_model").iterdir()
    return load_file(version / "student_model" / "model.safetensors")


def _state_files(project: Path) -> list[Path]:
    return sorted((project / "data/09_training_state").glob("sft_student/*/*/state.pt"))


def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    straight = make_project_copy(tmp_path / "straight")
    _run(straight)
    assert not (straight / "data/09_training_state").exists()  # finished nodes leave no state behind

    crashed = make_project_copy(tmp_path / "crashed")
    process = subprocess.Popen(
        COMMAND, cwd=crashed, env=_environment(crashed), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not _state_files(crashed) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # kill -9, mid-training
    process.wait()
    [state_file] = _state_files(crashed)
    saved_step = torch.load(state_file, weights_only=True)["step"]
    assert 0 < saved_step < STUDENT_STEPS
    assert not (crashed / "data/06_models/student_model").exists() or not any(
        (crashed / "data/06_models/student_model").iterdir()
    )

    rerun = _run(crashed)
    assert "sft student: resuming from step" in rerun.stderr + rerun.stdout
    assert not _state_files(crashed)
    expected, got = _student_weights(straight), _student_weights(crashed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name  # identical on CPU, not merely close


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
    hook.after_context_created(SimpleNamespace(project_path=project_path))
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
    expected = tmp_path / STATE_ROOT / "train_toy" / state_folder_name({"table": TABLE, "params:x": PARAMS})
    assert seen["folder"] == expected
    assert seen["state_file"] == expected / "toy" / "state.pt"  # the loop saved its state there...
    assert not (tmp_path / STATE_ROOT).exists()  # ...and with both outputs saved, nothing is left
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
    [old_state] = (tmp_path / STATE_ROOT).glob("train_toy/0ddc0de0-*/toy/state.pt")
    other_inputs = tmp_path / STATE_ROOT / "train_toy" / f"{code_fingerprint()}-0123456789abcdef"
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
    [state_file] = (tmp_path / STATE_ROOT).glob("train_toy/*/toy/state.pt")
    assert torch.load(state_file, weights_only=True)["step"] == 2
    assert current_state_folder() is None
