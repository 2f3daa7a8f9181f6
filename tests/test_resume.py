"""Resume after a crash: `kill -9` a `kedro run` mid-training, run it again, get the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import make_project_copy
from warmup_distill_kedro.core.models.modeling import Checkpoint
from warmup_distill_kedro.hooks.training_state import input_fingerprint

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
    saved_step = torch.load(state_file, weights_only=False)["step"]
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
    from warmup_distill_kedro.core.models.modeling import ModelSize, build_model
    from warmup_distill_kedro.core.models.tokenization import TokenizerConfig, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["a b c 1 2 3"] * 20, TokenizerConfig(vocab_size=270))
    size = ModelSize(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)

    def checkpoint(seed: int) -> Checkpoint:
        return Checkpoint(model=build_model(size, tokenizer, seed=seed), tokenizer=tokenizer, metadata={})

    base = {"student": checkpoint(0), "params:x": {"lr": 0.1}}
    assert input_fingerprint(base) == input_fingerprint({"student": checkpoint(0), "params:x": {"lr": 0.1}})
    assert input_fingerprint(base) != input_fingerprint({**base, "student": checkpoint(1)})
    assert input_fingerprint(base) != input_fingerprint({**base, "params:x": {"lr": 0.2}})
