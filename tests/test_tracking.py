"""tracking.py: the MLflow helpers the hook and the training loop share: where the store and artifacts
are, parameters flattened for MLflow, step metrics outside a run."""

from __future__ import annotations

import json

import mlflow
from pydantic import BaseModel

from warmup_distill_kedro.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    TRUNCATION_MARKER,
    default_artifact_location,
    default_tracking_uri,
    flatten_params,
    log_step_metrics,
    resolve_tracking_uri,
    runs_page_url,
)


def test_locations(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path.resolve()
    assert default_tracking_uri(tmp_path) == f"sqlite:///{root.as_posix()}/mlflow.db"
    assert default_tracking_uri(tmp_path).startswith("sqlite:////")
    assert default_artifact_location(tmp_path) == (root / "mlruns").as_uri()
    assert resolve_tracking_uri(None, tmp_path) == default_tracking_uri(tmp_path)
    assert resolve_tracking_uri("sqlite:///db/m.db", tmp_path) == f"sqlite:///{root.as_posix()}/db/m.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/m.db")
    assert resolve_tracking_uri(None, tmp_path) == "sqlite:////elsewhere/m.db"


class Schedule(BaseModel):
    warmup: int = 2
    kind: str = "cosine"


def test_flatten_params():
    flat = flatten_params(
        {
            "a": {"b": 1, "c": {"d": "x"}},
            "layers": [4, 8],
            "pairs": [{"k": 1}],
            "schedule": Schedule(),
            "empty": {},
            "long": "y" * (MAX_PARAM_VALUE_LENGTH + 10),
        }
    )
    assert flat["a.b"] == "1"
    assert flat["a.c.d"] == "x"
    assert json.loads(flat["layers"]) == [4, 8]
    assert json.loads(flat["pairs"]) == [{"k": 1}]
    assert flat["schedule.warmup"] == "2"
    assert flat["schedule.kind"] == "cosine"
    assert flat["empty"] == "{}"
    assert len(flat["long"]) == MAX_PARAM_VALUE_LENGTH
    assert flat["long"].endswith(TRUNCATION_MARKER)
    assert flatten_params(Schedule(), prefix="s") == {"s.warmup": "2", "s.kind": "cosine"}


def test_log_step_metrics_without_active_run_does_nothing():
    assert mlflow.active_run() is None
    log_step_metrics({"loss": 1.0}, step=0)
    assert mlflow.active_run() is None


def test_the_runs_page_of_the_experiment_opens_on_its_training_runs(tmp_path, monkeypatch):
    """MLflow 3 opens an experiment on its GenAI overview unless the model-training view is asked for."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert runs_page_url(tmp_path) == "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
    assert not (tmp_path / "mlflow.db").exists()  # looking did not create a store
    experiment = mlflow.MlflowClient(default_tracking_uri(tmp_path)).create_experiment("warmup-distill")
    assert runs_page_url(tmp_path) == (
        f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning"
    )
