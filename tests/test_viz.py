"""`kedro viz build` renders the lineage: every pipeline, and the distill grid as namespaced groups that
collapse to one box per variant, with layer bands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from warmup_distill_kedro.pipeline_registry import STAGES


def test_viz_build_shows_every_pipeline_and_the_grid_at_a_glance(project_copy: Path) -> None:
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

    # The grid `kedro run` runs (conf/base: fkl and sft over seeds 0, 1, 2), read from the configuration
    # although kedro-viz leaves the project's hooks out: a cell holds one box per seed.
    groups = set(main["modular_pipelines"])
    for variant in ("vanilla", "warmup"):
        for objective in ("fkl", "sft"):
            assert {f"{variant}.{objective}", *(f"{variant}.{objective}.seed{s}" for s in range(3))} <= groups
    assert not {g for g in groups if g.startswith(("vanilla.rkl", "vanilla.js"))}  # not the built-in grid

    names = {n["name"] for n in main["nodes"]}
    # The lineage runs from the data through the corrected set and the checkpoints to the report.
    for dataset in (
        "train_examples",
        "rollouts",
        "corrected_set",
        "student_warmup",
        "warmup.fkl.seed1.student",
        "warmup.fkl.seed1.evaluation_metrics",
        "report_table",
    ):
        assert dataset in names, dataset
    edges = {(e["source"], e["target"]) for e in main["edges"]}
    ids = {n["name"]: n["id"] for n in main["nodes"]}
    # Task nodes carry their own name, which says whose node it is; the namespace is their modular pipeline.
    evaluate_node = next(
        n
        for n in main["nodes"]
        if n["name"] == "evaluate_warmup_fkl_seed1"
        and "warmup.fkl.seed1" in (n.get("modular_pipelines") or [])
    )
    assert (ids["warmup.fkl.seed1.student"], evaluate_node["id"]) in edges
    tasks = [n["name"] for n in main["nodes"] if n["type"] == "task"]
    assert len(tasks) == len(set(tasks))  # no two labels alike ("distill", "evaluate" once per cell)

    # The default view reads at a glance: the collapsed grid is one box per variant with one output each,
    # the cells' outputs inside them, and layer bands in one order.
    assert "circular dependency" not in result.stdout + result.stderr
    assert main["layers"] == [
        "intermediate", "primary", "models", "model_output", "model_input", "distilled", "evaluation", "reporting",
    ]  # fmt: skip
    names = {n["id"]: n["name"] for n in main["nodes"]}
    groups = main["modular_pipelines"]
    for variant in ("vanilla", "warmup", "control"):
        # The variant's results alone: its evaluations, training metrics and explain records gathered.
        assert {names[o] for o in groups[variant]["outputs"]} == {f"{variant}.results"}, variant
    assert {names[o] for o in groups["vanilla.fkl.seed0"]["outputs"]} == {
        "vanilla.fkl.seed0.distill_metrics",
        "vanilla.fkl.seed0.evaluation_metrics",
        "vanilla.fkl.seed0.predictions",
        "vanilla.fkl.seed0.explain_tokens",  # the first seed's run is the one explained
    }  # the run's outputs, inside the cell's and the variant's boxes
    assert {names[o] for o in groups["vanilla.fkl.seed1"]["outputs"]} == {
        "vanilla.fkl.seed1.distill_metrics",
        "vanilla.fkl.seed1.evaluation_metrics",
        "vanilla.fkl.seed1.predictions",
    }
    top = [c for c in groups["__root__"]["children"] if c["type"] == "data"]
    grid_outputs = [
        names[c["id"]] for c in top if names[c["id"]].split(".")[0] in ("vanilla", "warmup", "control")
    ]
    assert sorted(grid_outputs) == ["control.results", "vanilla.results", "warmup.results"]
