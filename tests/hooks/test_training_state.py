"""hooks/training_state.py: resume after a crash. In process, the hook gives a training node its state folder,
keyed by the content of its inputs, and deletes it once the node's outputs are saved (keeps it when the node
fails); end to end, `kill -9` a `kedro run` mid-training, run it again, get the uninterrupted result."""

from __future__ import annotations

import os
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
)
from warmup_distill_kedro.core.training.batches import ShuffledBatches
from warmup_distill_kedro.core.training.context import current_state_folder
from warmup_distill_kedro.core.training.loop import TrainingRun
from warmup_distill_kedro.hooks.training_state import STATE_FOLDER, TrainingStateHook, input_fingerprint

# The hook's state root for an environment whose data_root is data/env (see _run_with_the_hook).
STATE_ROOT_OF_THE_ENV = Path("data/env") / STATE_FOLDER
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
    [version] = (project / f"{TEST_DATA}/06_models/student_model").iterdir()
    return load_file(version / "student_model" / "model.safetensors")


def _state_files(project: Path) -> list[Path]:
    return sorted((project / f"{TEST_DATA}/09_training_state").glob("sft_student/*/*/state.pt"))


def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    straight = make_project_copy(tmp_path / "straight")
    _run(straight)
    assert not (straight / f"{TEST_DATA}/09_training_state").exists()  # finished nodes leave no state behind

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
    saved_step = torch.load(state_file, weights_only=False)["step"]
    assert 0 < saved_step < STUDENT_STEPS
    assert not (crashed / f"{TEST_DATA}/06_models/student_model").exists() or not any(
        (crashed / f"{TEST_DATA}/06_models/student_model").iterdir()
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


def _run_with_the_hook(project_path: Path, fail: bool = False) -> dict:
    """A `training` node (a toy run saving its state every step) and an untagged one, run with the hook."""
    seen: dict = {}

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
        / input_fingerprint({"table": TABLE, "params:x": PARAMS})
    )
    assert seen["folder"] == expected
    assert seen["state_file"] == expected / "toy" / "state.pt"  # the loop saved its state there...
    assert not (tmp_path / STATE_ROOT_OF_THE_ENV).exists()  # ...and with both outputs saved, nothing is left
    assert seen["untagged_folder"] is None  # a node not tagged `training` gets no folder
    assert seen["after"] is None


def test_a_failed_training_node_keeps_its_state_for_the_next_run(tmp_path):
    with pytest.raises(RuntimeError, match="the node failed after training"):
        _run_with_the_hook(tmp_path, fail=True)
    [state_file] = (tmp_path / STATE_ROOT_OF_THE_ENV).glob("train_toy/*/toy/state.pt")
    assert torch.load(state_file, weights_only=False)["step"] == 2
    assert current_state_folder() is None
