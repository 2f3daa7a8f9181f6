"""Shared fixtures: a throwaway copy of the project, so end-to-end runs never touch the real data/ or
mlflow.db; the distill grid's shape, restored after the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import make_project_copy
from warmup_distill_kedro import grid

# Tests share 2 cores with whatever else runs; one thread keeps timings steady and avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture
def project_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The project's conf/ and pyproject.toml in tmp_path, as cwd, with its own MLflow store."""
    make_project_copy(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    return tmp_path


@pytest.fixture
def use_grid() -> Iterator[Callable[[list[str], list[str]], None]]:
    """`use_grid(variants, objectives, **more)`: the distill grid pipelines are built for (as
    GridParametersHook sets it from a run's `distill` parameters, `more` being others of them); the defaults
    again after the test."""

    def use(variants: list[str], objectives: list[str], **more) -> None:
        grid.use_parameters({"variants": variants, "objectives": objectives, **more})

    yield use
    grid.use_parameters({})
