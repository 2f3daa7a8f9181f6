"""MLflowTrackingHook and tracking helpers against a real MLflow sqlite store (no mocks).

The pipeline tests drive a real ``SequentialRunner`` through a Kedro hook manager, with a real
``KedroContext`` (``OmegaConfigLoader`` on a throwaway ``conf/`` using the project's config patterns) and its
catalog, calling the pipeline hooks exactly as ``KedroSession.run`` does. One sqlite store is shared by the
module (creating one runs migrations); every test uses its own experiment.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import kedro
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from kedro.config import OmegaConfigLoader
from kedro.framework.context import KedroContext
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.pipeline import Pipeline, node
from kedro.runner import SequentialRunner
from mlflow import MlflowClient
from pydantic import BaseModel

from warmup_distill_kedro.hooks.mlflow_tracking import (
    MLflowTrackingHook,
    TrackingConfigError,
    TrackingStoreError,
)
from warmup_distill_kedro.settings import CONFIG_LOADER_ARGS
from warmup_distill_kedro.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    TRUNCATION_MARKER,
    TrackingConfig,
    default_artifact_location,
    default_tracking_uri,
    flatten_params,
    log_step_metrics,
    resolve_tracking_uri,
)

PARAMS = {
    "training": {"lr": 0.01, "schedule": {"warmup": 2, "steps": 3}, "layers": [4, 8]},
    "prep": {"seed": 1},
}
RAW_VERSIONS = ("2020-01-01T00.00.00.000Z", "2021-06-01T00.00.00.000Z")
CATALOG = {
    "raw": {"type": "pandas.CSVDataset", "filepath": "data/raw.csv", "versioned": True},
    "model_table": {"type": "pandas.CSVDataset", "filepath": "data/model_table.csv", "versioned": True},
}


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project root whose default store (``tracking_uri: null``) is shared by the module's tests."""
    root = tmp_path_factory.mktemp("project")
    for version in RAW_VERSIONS:
        folder = root / "data" / "raw.csv" / version
        folder.mkdir(parents=True)
        pd.DataFrame({"x": [1.0, 2.0, 3.0]}).to_csv(folder / "raw.csv", index=False)
    previous_uri = mlflow.get_tracking_uri()
    yield root
    mlflow.set_tracking_uri(previous_uri)


@pytest.fixture(autouse=True)
def _no_leftover_active_run():
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run("KILLED")


def make_context(project_path: Path, conf_dir: Path, mlflow_conf: dict | None, hook_manager) -> KedroContext:
    (conf_dir / "base").mkdir(parents=True)
    (conf_dir / "local").mkdir()
    if mlflow_conf is not None:
        (conf_dir / "base" / "mlflow.yml").write_text(yaml.safe_dump({"mlflow": mlflow_conf}))
    (conf_dir / "base" / "parameters.yml").write_text(yaml.safe_dump(PARAMS))
    (conf_dir / "base" / "catalog.yml").write_text(yaml.safe_dump(CATALOG))
    loader = OmegaConfigLoader(conf_source=str(conf_dir), env=None, **CONFIG_LOADER_ARGS)
    context = KedroContext(
        project_path=project_path,
        config_loader=loader,
        env=None,
        package_name="warmup_distill_kedro",
        hook_manager=hook_manager,
    )
    context._pipelines_to_validate = []  # KedroSession.run scopes parameter validation to the pipelines run
    return context


def kedro_run(hook_manager, context: KedroContext, pipeline: Pipeline, names=("demo",), session_id="s-1"):
    """What ``KedroSession.run`` does around the runner (kedro/framework/session/session.py, 1.7.0)."""
    runner = SequentialRunner()
    catalog = context.catalog
    run_params = {
        "run_id": session_id,
        "project_path": context.project_path.as_posix(),
        "env": context.env,
        "kedro_version": kedro.__version__,
        "pipeline_names": list(names),
        "runner": getattr(runner, "__name__", str(runner)),
    }
    hook_manager.hook.before_pipeline_run(run_params=run_params, pipeline=pipeline, catalog=catalog)
    try:
        result = runner.run(pipeline, catalog, hook_manager, run_id=session_id)
    except Exception as error:
        hook_manager.hook.on_pipeline_error(
            error=error, run_params=run_params, pipeline=pipeline, catalog=catalog
        )
        raise
    hook_manager.hook.after_pipeline_run(
        run_params=run_params, run_result=result, pipeline=pipeline, catalog=catalog
    )
    return result


def tracked_context(project: Path, tmp_path: Path, experiment: str, **mlflow_conf):
    hook = MLflowTrackingHook()
    hook_manager = _create_hook_manager()
    hook_manager.register(hook)
    conf = {"enabled": True, "tracking_uri": None, "experiment_name": experiment, **mlflow_conf}
    context = make_context(project, tmp_path / "conf", conf, hook_manager)
    hook_manager.hook.after_context_created(context=context)
    return hook, hook_manager, context


def runs_by_name(experiment: str) -> dict:
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return {run.info.run_name: run for run in client.search_runs([exp.experiment_id])}


# ------------------------------------------------------------------------------------------- pipelines
SEEN: dict = {}


def train(raw: pd.DataFrame, training: dict) -> tuple[pd.DataFrame, dict]:
    SEEN["thread"] = threading.get_ident()
    active = mlflow.active_run()
    SEEN["active_run"] = active.info.run_id if active else None
    for step in range(3):
        log_step_metrics({"loss": np.float32(1.0 / (step + 1)), "lr": training["lr"]}, step=step)
    metrics = {"final_loss": 0.25, "steps": 3, "note": "not a number", "eval": {"acc": 0.5}}
    return raw.assign(w=raw["x"] * training["lr"]), metrics


def evaluate(model_table: pd.DataFrame) -> dict:
    log_step_metrics({"eval_progress": 1.0}, step=0)  # a non-training node: the parent run is active
    return {"exact_match": 0.75, "label": "x"}


def train_fails(raw: pd.DataFrame, training: dict) -> pd.DataFrame:
    log_step_metrics({"loss": 1.0}, step=0)
    raise ValueError("boom: the loss diverged")


TRAIN_TAGS = ["training", "student", "variant.kd", "objective.fkl"]


# ----------------------------------------------------------------------------------------------- tests
def test_pipeline_run_is_tracked_end_to_end(project, tmp_path):
    hook, hook_manager, context = tracked_context(project, tmp_path, "e2e")
    assert hook.tracking_uri == default_tracking_uri(project)
    pipeline = Pipeline(
        [
            node(
                train,
                ["raw", "params:training"],
                ["model_table", "train_metrics"],
                name="train_student",
                tags=TRAIN_TAGS,
            ),
            node(evaluate, "model_table", "eval_metrics", name="evaluate"),
        ]
    )
    kedro_run(hook_manager, context, pipeline, names=("demo",), session_id="session-e2e")

    assert mlflow.active_run() is None
    runs = runs_by_name("e2e")
    assert sorted(runs) == ["demo", "train_student"]
    parent, child = runs["demo"], runs["train_student"]
    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e")
    assert experiment.artifact_location == default_artifact_location(project)

    # parent: named after the pipeline, kedro tags, all params flattened, parent-level metrics
    assert parent.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in parent.data.tags
    assert parent.data.tags["kedro.session_id"] == "session-e2e"
    assert parent.data.tags["kedro.pipelines"] == "demo"
    assert parent.data.tags["kedro.env"] == "local"
    assert parent.data.tags["kedro.runner"] == "SequentialRunner"
    assert parent.data.params["training.lr"] == "0.01"
    assert parent.data.params["training.schedule.warmup"] == "2"
    assert json.loads(parent.data.params["training.layers"]) == [4, 8]
    assert parent.data.params["prep.seed"] == "1"
    assert parent.data.metrics["eval_metrics.exact_match"] == 0.75
    assert "eval_metrics.label" not in parent.data.metrics
    assert parent.data.metrics["eval_progress"] == 1.0

    # child: nested under the parent, tags from the node, only its own params, its metrics
    assert child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["stage"] == "student"
    assert child.data.tags["variant"] == "kd"
    assert child.data.tags["objective"] == "fkl"
    assert child.data.params["training.schedule.steps"] == "3"
    assert "prep.seed" not in child.data.params
    assert child.data.metrics["final_loss"] == 0.25
    assert child.data.metrics["eval.acc"] == 0.5
    assert "note" not in child.data.metrics

    # step metrics from inside the node: the child run is active in the node's (= the caller's) thread
    assert SEEN["thread"] == threading.get_ident()
    assert SEEN["active_run"] == child.info.run_id
    history = client.get_metric_history(child.info.run_id, "loss")
    assert sorted((m.step, round(m.value, 4)) for m in history) == [(0, 1.0), (1, 0.5), (2, 0.3333)]
    assert not client.get_metric_history(parent.info.run_id, "loss")

    # versions: the folders really read/written on disk
    (saved,) = [p.name for p in (project / "data" / "model_table.csv").iterdir()]
    assert parent.data.tags["version.save.model_table"] == saved
    assert parent.data.tags["version.load.model_table"] == saved
    assert child.data.tags["version.save.model_table"] == saved
    assert parent.data.tags["version.load.raw"] == RAW_VERSIONS[-1]
    assert child.data.tags["version.load.raw"] == RAW_VERSIONS[-1]
    assert "version.load.model_table" not in child.data.tags  # loaded by `evaluate`, not by the child


def test_failing_training_node_marks_child_and_parent_failed(project, tmp_path):
    hook, hook_manager, context = tracked_context(project, tmp_path, "failing")
    pipeline = Pipeline(
        [node(train_fails, ["raw", "params:training"], "model_table", name="train_student", tags=TRAIN_TAGS)]
    )
    with pytest.raises(ValueError, match="boom"):
        kedro_run(hook_manager, context, pipeline, names=("warmup", "kd"), session_id="session-fail")

    assert mlflow.active_run() is None
    runs = runs_by_name("failing")
    parent, child = runs["warmup+kd"], runs["train_student"]
    assert parent.data.tags["kedro.pipelines"] == "warmup,kd"
    assert parent.info.status == "FAILED"
    assert child.info.status == "FAILED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.tags["error.type"] == "ValueError"
    assert "boom" in parent.data.tags["error.message"]
    assert child.data.tags["error.type"] == "ValueError"
    assert [m.step for m in MlflowClient().get_metric_history(child.info.run_id, "loss")] == [0]

    # the same hook tracks the next run of the process normally
    ok = Pipeline([node(evaluate, "raw", "eval_metrics", name="evaluate")])
    kedro_run(hook_manager, context, ok, names=("eval",), session_id="session-ok")
    assert runs_by_name("failing")["eval"].info.status == "FINISHED"


def test_disabled_tracking_touches_no_store(tmp_path):
    hook = MLflowTrackingHook()
    hook_manager = _create_hook_manager()
    hook_manager.register(hook)
    context = make_context(tmp_path, tmp_path / "conf", {"enabled": False}, hook_manager)
    (tmp_path / "data" / "raw.csv" / RAW_VERSIONS[0]).mkdir(parents=True)
    pd.DataFrame({"x": [1.0]}).to_csv(
        tmp_path / "data" / "raw.csv" / RAW_VERSIONS[0] / "raw.csv", index=False
    )
    uri_before = mlflow.get_tracking_uri()
    hook_manager.hook.after_context_created(context=context)
    pipeline = Pipeline(
        [node(train, ["raw", "params:training"], ["model_table", "train_metrics"], tags=TRAIN_TAGS)]
    )
    kedro_run(hook_manager, context, pipeline)
    assert not hook.tracking
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "mlruns").exists()
    assert mlflow.get_tracking_uri() == uri_before


def test_unknown_config_key_is_named(tmp_path):
    hook_manager = _create_hook_manager()
    context = make_context(tmp_path, tmp_path / "conf", {"trackng_uri": "x"}, hook_manager)
    with pytest.raises(TrackingConfigError, match="mlflow.trackng_uri"):
        MLflowTrackingHook().after_context_created(context)
    assert not (tmp_path / "mlflow.db").exists()


def test_missing_config_means_defaults(tmp_path):
    from warmup_distill_kedro.hooks.mlflow_tracking import load_tracking_config

    context = make_context(tmp_path, tmp_path / "conf", None, _create_hook_manager())
    assert load_tracking_config(context.config_loader) == TrackingConfig()


def test_unopenable_store_names_the_uri(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    uri = f"sqlite:///{(tmp_path / 'a_file' / 'mlflow.db').as_posix()}"
    context = make_context(tmp_path, tmp_path / "conf", {"tracking_uri": uri}, _create_hook_manager())
    uri_before = mlflow.get_tracking_uri()
    with pytest.raises(TrackingStoreError, match="a_file/mlflow.db"):
        MLflowTrackingHook().after_context_created(context)
    assert mlflow.get_tracking_uri() == uri_before


def test_unopenable_store_runs_untracked_when_asked(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    uri = f"sqlite:///{(tmp_path / 'a_file' / 'mlflow.db').as_posix()}"
    hook = MLflowTrackingHook()
    hook_manager = _create_hook_manager()
    hook_manager.register(hook)
    config = {"tracking_uri": uri, "on_store_error": "continue_untracked"}
    context = make_context(tmp_path, tmp_path / "conf", config, hook_manager)
    (tmp_path / "data" / "raw.csv" / RAW_VERSIONS[0]).mkdir(parents=True)
    pd.DataFrame({"x": [1.0]}).to_csv(
        tmp_path / "data" / "raw.csv" / RAW_VERSIONS[0] / "raw.csv", index=False
    )
    hook_manager.hook.after_context_created(context=context)
    pipeline = Pipeline(
        [node(train, ["raw", "params:training"], ["model_table", "train_metrics"], tags=TRAIN_TAGS)]
    )
    kedro_run(hook_manager, context, pipeline)  # the run itself completes, untracked
    assert not hook.tracking
    assert not (tmp_path / "mlruns").exists()


def test_a_store_that_refuses_writes_stops_the_run_at_start(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("attempt to write a readonly database")

    # Opening the store sets $MLFLOW_TRACKING_URI (MLflow's doing); monkeypatch restores it afterwards.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    context = make_context(tmp_path, tmp_path / "conf", {}, _create_hook_manager())
    MLflowTrackingHook().after_context_created(context)  # the store and experiment exist and open...
    monkeypatch.setattr(MlflowClient, "set_experiment_tag", read_only)  # ...but now refuse writes
    with pytest.raises(TrackingStoreError, match=r"(?s)mlflow.db.*readonly database.*continue_untracked"):
        MLflowTrackingHook().after_context_created(context)


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
