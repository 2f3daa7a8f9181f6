"""hooks/mlflow_tracking.py: MLflowTrackingHook against a real MLflow sqlite store (no mocks).

The pipeline tests drive a real ``SequentialRunner`` through a Kedro hook manager, with a real
``KedroContext`` (``OmegaConfigLoader`` on a throwaway ``conf/`` using the project's config patterns) and its
catalog, calling the pipeline hooks exactly as ``KedroSession.run`` does (``tests.helpers.kedro_run``). One
sqlite store is shared by the module (creating one runs migrations); every test uses its own experiment.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.pipeline import Pipeline, node
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mlflow import MlflowClient

from tests.helpers import RAW_VERSIONS, SEEN, TRAIN_TAGS, kedro_run, make_context, train, write_raw
from warmup_distill_kedro.hooks.mlflow_tracking import (
    MLflowTrackingHook,
    TrackingConfigError,
    TrackingStoreError,
    child_run_name,
    evaluation_summary,
    node_run_tags,
    parent_run_name,
)
from warmup_distill_kedro.tracking import (
    TrackingConfig,
    config_fingerprint,
    default_artifact_location,
    default_tracking_uri,
    log_step_metrics,
)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project root whose default store (``tracking_uri: null``) is shared by the module's tests."""
    root = tmp_path_factory.mktemp("project")
    write_raw(root, [1.0, 2.0, 3.0], RAW_VERSIONS)
    previous_uri = mlflow.get_tracking_uri()
    yield root
    mlflow.set_tracking_uri(previous_uri)


@pytest.fixture(autouse=True)
def _no_leftover_active_run():
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run("KILLED")


def tracked_context(project: Path, tmp_path: Path, experiment: str, **mlflow_conf):
    hook = MLflowTrackingHook()
    hook_manager = _create_hook_manager()
    hook_manager.register(hook)
    conf = {"enabled": True, "tracking_uri": None, "experiment_name": experiment, **mlflow_conf}
    context = make_context(project, tmp_path / "conf", conf, hook_manager)
    hook_manager.hook.after_context_created(context=context)
    return hook, hook_manager, context


def runs_by_name(experiment: str) -> dict:
    """Runs by the first part of their name (``demo`` of ``demo · local · ...``)."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return {run.info.run_name.split(" · ")[0]: run for run in client.search_runs([exp.experiment_id])}


# ------------------------------------------------------------------------------------------- node functions
def evaluate(model_table: pd.DataFrame) -> dict:
    log_step_metrics({"eval_progress": 1.0}, step=0)  # a non-training node: the parent run is active
    return {"exact_match": 0.75, "label": "x"}


def train_fails(raw: pd.DataFrame, training: dict) -> pd.DataFrame:
    log_step_metrics({"loss": 1.0}, step=0)
    raise ValueError("boom: the loss diverged")


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
    assert sorted(runs) == ["demo", "kd.fkl.student"]
    parent, child = runs["demo"], runs["kd.fkl.student"]
    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e")
    assert experiment.artifact_location == default_artifact_location(project)
    # MLflow 3 opens a model-training experiment on its runs, not on the GenAI overview
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # names that tell runs apart: pipelines, environment, the grid (no --params here); the cell and stage
    assert parent.info.run_name == "demo · local · vanilla+warmup × 8 objectives"
    assert child.info.run_name == "kd.fkl.student · local"
    # the configuration's fingerprint on both, for filtering and for `kedro compare`
    assert parent.data.tags["config"] == child.data.tags["config"] == config_fingerprint(parent.data.params)

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
    parent, child = runs["warmup+kd"], runs["kd.fkl.student"]
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


def report(raw: pd.DataFrame) -> tuple[pd.DataFrame, Figure, str, dict]:
    """A node whose outputs are a table, a figure, text and a mapping."""
    figure = Figure()
    FigureCanvasAgg(figure)
    figure.subplots().plot(raw["x"])
    return raw.assign(y=raw["x"] * 2), figure, "# report", {"rows": len(raw)}


def test_outputs_of_nodes_tagged_mlflow_artifacts_are_artifacts_of_the_parent_run(project, tmp_path):
    hook, hook_manager, context = tracked_context(project, tmp_path, "artifacts")
    pipeline = Pipeline(
        [
            node(
                report,
                "raw",
                ["table", "figure", "text", "summary"],
                name="report",
                tags=["mlflow_artifacts"],
            ),
            node(lambda table: table, "table", "untagged_table", name="copy"),
        ]
    )
    kedro_run(hook_manager, context, pipeline, names=("demo",), session_id="session-artifacts")

    [parent] = runs_by_name("artifacts").values()
    client = MlflowClient()
    artifacts = sorted(artifact.path for artifact in client.list_artifacts(parent.info.run_id))
    assert artifacts == ["figure.png", "summary.json", "table.csv", "text.md"]  # not untagged_table
    download = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path / "artifacts")))
    assert pd.read_csv(download / "table.csv")["y"].tolist() == [2.0, 4.0, 6.0]
    assert (download / "text.md").read_text() == "# report"
    assert json.loads((download / "summary.json").read_text()) == {"rows": 3}
    assert (download / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_disabled_tracking_touches_no_store(tmp_path):
    hook = MLflowTrackingHook()
    hook_manager = _create_hook_manager()
    hook_manager.register(hook)
    context = make_context(tmp_path, tmp_path / "conf", {"enabled": False}, hook_manager)
    write_raw(tmp_path, [1.0])
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
    write_raw(tmp_path, [1.0])
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


# ------------------------------------------------------------------------------------------ names, summary
def test_parent_run_names_tell_runs_apart():
    grid = {
        "distill": {"variants": ["vanilla", "warmup"], "objectives": ["fkl", "js"], "training": {"seed": 0}}
    }
    assert (
        parent_run_name(["__default__"], "test", None, grid)
        == "__default__ · test · vanilla+warmup × fkl+js · seed 0"
    )
    eight = {"distill": {"objectives": "fkl rkl js skl srkl akl dskd sft", "training": {"seed": 2}}}
    assert parent_run_name(["__default__"], "local", {}, eight) == (
        "__default__ · local · vanilla+warmup × 8 objectives · seed 2"
    )
    # parameters given on the command line replace the grid; a seed given there is not repeated
    given = {"distill": {"training": {"seed": 1}}}
    assert parent_run_name(["distill", "evaluate"], "local", given, given) == (
        "distill+evaluate · local · distill.training.seed=1"
    )
    long = {"bootstrap": {"teacher": {"training": {f"option_{i}": i for i in range(20)}}}}
    assert len(parent_run_name(["data"], "local", long, {}).split(" · ")[2]) == 80  # cut, with "…"


def test_child_run_names_carry_the_cell_and_the_seed():
    cell = node(train, ["raw", "params:training"], "out", name="distill_vanilla_fkl", namespace="vanilla.fkl",
                tags=["distill", "training", "variant.vanilla", "objective.fkl"])  # fmt: skip
    assert child_run_name(cell, "test", "1") == "vanilla.fkl.distill · test · seed 1"
    # One run of a grid of several seeds: its seed (from its node's tag) where the run list shows it.
    seeded = node(train, ["raw", "params:training"], "out", name="distill_vanilla_fkl_seed2",
                  namespace="vanilla.fkl.seed2", tags=["distill", "training", "variant.vanilla", "objective.fkl",
                                                       "seed.2"])  # fmt: skip
    assert child_run_name(seeded, "test", "0 1 2") == "vanilla.fkl.seed2.distill · test"
    assert node_run_tags(seeded)["seed"] == "2" and node_run_tags(seeded)["stage"] == "distill"
    other = node(train, ["raw", "params:training"], "out", name="sft_teacher", tags=["bootstrap", "training"])
    assert child_run_name(other, "local", None) == "sft_teacher · local"


def test_the_parent_run_keeps_the_headline_scores_of_an_evaluation():
    evaluation = {
        "subject": "warmup.fkl",
        "math": {"exact_match": 0.5, "n_examples": 4},
        "instruction": {"rouge_l": 0.25, "rouge_l_per_seed": {"0": 0.2, "1": 0.3}},
        "distribution": {"heldout_nll": 1.5},
    }
    assert evaluation_summary(evaluation) == {
        "math.exact_match/warmup.fkl": 0.5,
        "instruction.rouge_l/warmup.fkl": 0.25,
    }


def test_the_config_fingerprint_ignores_seeds_only():
    params = {"distill.training.seed": "0", "evaluate.rouge_seeds": "[0, 1]", "distill.temperature": "2"}
    same = {**params, "distill.training.seed": "1", "evaluate.rouge_seeds": "[5]", "data.split.seed": "3"}
    assert config_fingerprint(same) == config_fingerprint(params)
    assert config_fingerprint({**params, "distill.temperature": "1"}) != config_fingerprint(params)
