"""`kedro viz build` renders the lineage: every pipeline, and the distill grid as namespaced groups."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from warmup_distill_kedro.pipeline_registry import STAGES


def test_viz_build_shows_every_pipeline_and_the_namespaced_grid(project_copy: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kedro", "viz", "build"],
        cwd=project_copy,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    main = json.loads((project_copy / "build/api/main").read_text())

    pipelines = {p["id"] for p in main["pipelines"]}
    assert {*STAGES, "__default__", "from_checkpoints"} <= pipelines

    groups = set(main["modular_pipelines"])
    for variant in ("vanilla", "warmup"):
        for objective in ("fkl", "rkl", "js", "skl", "srkl", "akl", "dskd", "sft"):
            assert f"{variant}.{objective}" in groups, f"{variant}.{objective}"

    names = {n["name"] for n in main["nodes"]}
    # The lineage runs from the data through the corrected set and the checkpoints to the report.
    for dataset in (
        "train_examples",
        "rollouts",
        "corrected_set",
        "student_warmup",
        "warmup.fkl.student",
        "warmup.fkl.evaluation_metrics",
        "report_table",
    ):
        assert dataset in names, dataset
    edges = {(e["source"], e["target"]) for e in main["edges"]}
    ids = {n["name"]: n["id"] for n in main["nodes"]}
    # Task nodes carry their short name; the namespace is their modular pipeline.
    evaluate_node = next(
        n["id"]
        for n in main["nodes"]
        if n["name"] == "evaluate" and "warmup.fkl" in (n.get("modular_pipelines") or [])
    )
    assert (ids["warmup.fkl.student"], evaluate_node) in edges
