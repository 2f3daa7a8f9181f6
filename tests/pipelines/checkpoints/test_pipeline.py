"""`kedro run --pipeline=checkpoints` on a local folder: converted once into a versioned checkpoint, a
student cut from it once, a changed source converted again; the same nodes on the packaged models are
tests/test_real_models.py's."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from tests.helpers import MATH_CORPUS, TEST_DATA, bpe_tokenizer, tiny_checkpoint, version_folders
from warmup_distill_kedro.core.models.modeling import ModelSize, load_checkpoint, save_checkpoint
from warmup_distill_kedro.pipelines.checkpoints.pipeline import SLOTS

FOUR_LAYERS = ModelSize(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32)
ONLY_SMOLLM2 = ["checkpoint.smollm2", "checkpoint.smollm2_cut"]


def _run(project: Path, source: Path) -> None:
    bootstrap_project(project)
    params = {"checkpoints": {"smollm2": {"source": str(source)}, "student": {"keep_layers": [0, 3]}}}
    with KedroSession.create(project_path=project, env="test", runtime_params=params) as session:
        session.run(pipeline_names=["checkpoints"], tags=ONLY_SMOLLM2)


def test_a_local_folder_is_converted_once_and_a_student_cut_once(project_copy: Path) -> None:
    source = project_copy / "my_model"
    save_checkpoint(tiny_checkpoint(bpe_tokenizer(MATH_CORPUS), size=FOUR_LAYERS), source)
    converted = project_copy / TEST_DATA / "06_models/checkpoints/smollm2"
    cut = project_copy / TEST_DATA / "06_models/checkpoints/smollm2_cut"

    _run(project_copy, source)
    assert len(version_folders(converted)) == len(version_folders(cut)) == 1
    teacher = load_checkpoint(version_folders(converted)[0] / "smollm2")
    student = load_checkpoint(version_folders(cut)[0] / "smollm2_cut")
    assert teacher.metadata["source_kind"] == "folder"
    assert teacher.metadata["source_file"] == str(source)
    assert student.metadata["keep_layers"] == [0, 3]
    assert student.metadata["started_from"]["catalog_version"] == version_folders(converted)[0].name
    assert torch.equal(
        student.model.model.layers[1].mlp.up_proj.weight, teacher.model.model.layers[3].mlp.up_proj.weight
    )
    record = json.loads(
        (
            version_folders(project_copy / TEST_DATA / "01_raw/checkpoints/smollm2_source.json")[0]
            / "smollm2_source.json"
        ).read_text()
    )
    assert record["sha256"] == teacher.metadata["source_sha256"]

    _run(project_copy, source)  # the same source: nothing converted or cut again
    assert len(version_folders(converted)) == len(version_folders(cut)) == 1
    # MLflow names the version the run's output is: the one kept, not a version that was never written.
    (latest_parent,) = mlflow.search_runs(
        experiment_names=["warmup-distill"], filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list",
    )  # fmt: skip
    assert latest_parent.data.tags["version.save.smollm2_checkpoint"] == version_folders(converted)[0].name

    save_checkpoint(
        tiny_checkpoint(bpe_tokenizer(MATH_CORPUS), size=FOUR_LAYERS, seed=1), project_copy / "other"
    )
    _run(project_copy, project_copy / "other")  # another source: a new conversion, and a new cut from it
    assert len(version_folders(converted)) == len(version_folders(cut)) == 2
    newest = load_checkpoint(version_folders(cut)[-1] / "smollm2_cut")
    assert newest.metadata["started_from"]["catalog_version"] == version_folders(converted)[-1].name


def test_every_slot_has_a_source_parameter() -> None:
    import yaml

    from tests.helpers import PROJECT_ROOT

    params = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_checkpoints.yml").read_text())[
        "checkpoints"
    ]
    assert set(SLOTS) <= set(params)
    assert all(params[slot]["source"] == "package" for slot in SLOTS)
