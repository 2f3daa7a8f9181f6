"""Shared fixtures: a throwaway copy of the project, so end-to-end runs never touch the real data/ or mlflow.db."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Tests share 2 cores with whatever else runs; one thread keeps timings steady and avoids oversubscription.
torch.set_num_threads(1)


def make_project_copy(folder: Path) -> Path:
    """The project's conf/ (without conf/local) and pyproject.toml in `folder`: a project to run."""
    shutil.copytree(PROJECT_ROOT / "conf", folder / "conf", ignore=shutil.ignore_patterns("local"))
    (folder / "conf" / "local").mkdir()
    shutil.copy(PROJECT_ROOT / "pyproject.toml", folder / "pyproject.toml")
    (folder / "src").mkdir()  # Kedro checks that it exists; the package itself is installed
    (folder / "data").mkdir()
    return folder


@pytest.fixture
def project_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The project's conf/ and pyproject.toml in tmp_path, as cwd, with its own MLflow store."""
    make_project_copy(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    return tmp_path
