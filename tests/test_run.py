"""End to end through a KedroSession at test size (`conf/test`): the data and bootstrap pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from warmup_distill_kedro.datasets import COMPLETE_MARKER


def _run(project: Path, pipelines: list[str], **runtime_params) -> None:
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="test", runtime_params=runtime_params or None) as session:
        session.run(pipeline_names=pipelines)


def _versions(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def test_bootstrap_end_to_end(project_copy: Path) -> None:
    _run(project_copy, ["data", "bootstrap"])

    for split in ("train", "validation", "test"):
        assert (project_copy / f"data/03_primary/{split}_examples.parquet").is_file()
    for name in ("teacher_model", "student_model", "student_tokenizer"):
        versions = _versions(project_copy / "data/06_models" / name)
        assert len(versions) == 1, name
        checkpoint = versions[0] / name
        assert (checkpoint / COMPLETE_MARKER).is_file()
    assert (_versions(project_copy / "data/06_models/teacher_model")[0] / "teacher_model/config.json").is_file()

    summary_file = next((project_copy / "data/08_reporting/bootstrap_summary.json").glob("*/bootstrap_summary.json"))
    summary = json.loads(summary_file.read_text())
    assert summary["math_test_examples"] == 8
    for role in ("teacher", "student"):
        assert 0.0 <= summary[f"{role}_math_exact_match"] <= 1.0
    assert summary["teacher_parameters"] > summary["student_parameters"]

    mlflow.set_tracking_uri(f"sqlite:///{project_copy / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["warmup-distill"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["bootstrap.teacher.training.max_steps"] == "6"
    assert sorted(r.info.run_name for r in children) == ["sft_student", "sft_teacher"]
    teacher_run = next(r for r in children if r.info.run_name == "sft_teacher")
    assert "loss" in teacher_run.data.metrics and "eval/validation_nll" in teacher_run.data.metrics
    history = mlflow.tracking.MlflowClient().get_metric_history(teacher_run.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4, 6]  # log_every 2 over 6 steps
    saved_version = _versions(project_copy / "data/06_models/teacher_model")[0].name
    assert parents[0].data.tags["version.save.teacher_model"] == saved_version


def test_bootstrap_alone_reuses_the_latest_splits(project_copy: Path) -> None:
    _run(project_copy, ["data"])
    _run(project_copy, ["bootstrap"])
    assert len(_versions(project_copy / "data/06_models/student_model")) == 1


def test_a_bad_parameter_fails_before_any_node_runs(project_copy: Path) -> None:
    with pytest.raises(Exception, match=r"(?s)bootstrap\.teacher.*max_steps") as error:
        _run(project_copy, ["data", "bootstrap"], bootstrap={"teacher": {"training": {"max_steps": 0}}})
    assert "greater than 0" in str(error.value)
    assert not (project_copy / "data/02_intermediate/examples.parquet").exists()
