"""The MLflow comparison across kedro runs, on a tiny store written with the MLflow client.

The store holds three "kedro runs" of experiment warmup-distill (times in ms, all made up):

* P1, seed 0: bootstrap + distill + evaluate. Child runs for the teacher, the SFT student, the warmup
  student and the cells vanilla.fkl / warmup.fkl, each carrying its own evaluation.
* P2, seed 1: distill + evaluate only. Child runs for vanilla.fkl / warmup.fkl; the teacher it evaluated
  is P1's teacher run (same model), whose metrics it updated: one run, so one record.
* P3, seed 0 again, later: re-evaluated vanilla.fkl in the parent run itself (no child). Without a
  restriction it replaces P1's vanilla.fkl for seed 0 (logged).

These runs carry no environment or config tag and the same parameters but the seed: one group. Experiment
"groups" holds several (see `groups`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking._tracking_service import utils as tracking_utils

from tests.helpers import row
from warmup_distill_kedro.compare import MixedRunsError, commands, compare_table, runs_records, select_runs

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = PROJECT_ROOT / "notebooks" / "compare_runs.ipynb"
MATH, INSTRUCTION, KL = (
    "evaluation.math.exact_match",
    "evaluation.instruction.rouge_l",
    "evaluation.distribution.heldout_kl",
)


class Store:
    """A tiny MLflow store, written the way the project's hook logs kedro runs and evaluations."""

    def __init__(self, path: Path):
        self.uri = f"sqlite:///{path}"
        self.client = MlflowClient(tracking_uri=self.uri)
        self.ids: dict[str, str] = {}

    def experiment(self, name: str) -> str:
        return self.client.create_experiment(name)

    def run(
        self,
        experiment_id: str,
        name: str,
        start: int,
        *,
        parent: str | None = None,
        seed: int | None = None,
        evaluated: str | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> str:
        """A parent run (``parent`` None) or a child of ``parent``; ``evaluated``: "subject/variant/objective"
        of the model whose evaluation this run carries (evaluated by its parent, or by itself)."""
        run_id = self.client.create_run(experiment_id, start_time=start, run_name=name).info.run_id
        self.ids[name] = run_id
        tags = {
            **({"mlflow.parentRunId": self.ids[parent]} if parent else {"kedro.session_id": name}),
            **(tags or {}),
        }
        if evaluated:
            subject, variant, objective = evaluated.split("/")
            tags |= {
                "evaluation.subject": subject,
                "evaluation.variant": variant,
                "evaluation.objective": objective,
                "evaluation.parent_run_id": self.ids[parent] if parent else run_id,
            }
        self.client.log_batch(
            run_id,
            metrics=[Metric(key, value, start, 0) for key, value in (metrics or {}).items()],
            params=[
                *([Param("distill.training.seed", str(seed))] if seed is not None else []),
                *(Param(key, value) for key, value in (params or {}).items()),
            ],
            tags=[RunTag(key, value) for key, value in tags.items()],
        )
        self.client.set_terminated(run_id, end_time=start + 500)
        return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    store = Store(tmp_path_factory.mktemp("mlflow") / "mlflow.db")
    exp = store.experiment("warmup-distill")
    store.run(exp, "P1", 1_000, seed=0)
    for name, start, metrics in [
        ("teacher/teacher/teacher", 1_100, {MATH: 0.85, INSTRUCTION: 0.60}),
        ("student/vanilla/before_kd", 1_200, {MATH: 0.30, INSTRUCTION: 0.40}),
        ("warmup_student/warmup/before_kd", 1_300, {MATH: 0.28, INSTRUCTION: 0.38}),
        ("vanilla.fkl/vanilla/fkl", 1_400, {MATH: 0.40, INSTRUCTION: 0.50, KL: 0.125}),
        ("warmup.fkl/warmup/fkl", 1_500, {MATH: 0.44, INSTRUCTION: 0.52, KL: 0.120}),
    ]:
        store.run(exp, f"P1.{name.split('/')[0]}", start, parent="P1", evaluated=name, metrics=metrics)
    store.run(exp, "P2", 3_000, seed=1)
    for name, start, metrics in [
        ("vanilla.fkl/vanilla/fkl", 3_100, {MATH: 0.42, INSTRUCTION: 0.46, KL: 0.135}),
        ("warmup.fkl/warmup/fkl", 3_200, {MATH: 0.48, INSTRUCTION: 0.50, KL: 0.110}),
    ]:
        store.run(exp, f"P2.{name.split('/')[0]}", start, parent="P2", evaluated=name, metrics=metrics)
    # P2 evaluated P1's teacher again (same model, same run): a later value, and P2 as the evaluating run
    teacher = store.ids["P1.teacher"]
    store.client.log_metric(teacher, MATH, 0.90, timestamp=3_300, step=1)
    store.client.set_tag(teacher, "evaluation.parent_run_id", store.ids["P2"])
    store.run(
        exp, "P3", 5_000, seed=0, evaluated="vanilla.fkl/vanilla/fkl", metrics={MATH: 0.10, INSTRUCTION: 0.20}
    )

    store.experiment("empty")
    no_seed = store.experiment("no-seed")
    store.run(no_seed, "Q1", 1_000)
    store.run(
        no_seed, "Q1.cell", 1_100, parent="Q1", evaluated="vanilla.fkl/vanilla/fkl", metrics={MATH: 0.5}
    )
    broken = store.experiment("broken")
    store.run(broken, "B1", 1_000, seed=0)
    bad = store.run(
        broken, "B1.cell", 1_100, parent="B1", evaluated="vanilla.fkl/vanilla/fkl", metrics={MATH: 0.5}
    )
    store.client.delete_tag(bad, "evaluation.variant")
    return store


def test_runs_records_use_training_seeds_and_count_the_teacher_once(store, caplog):
    records = runs_records(store.uri, "warmup-distill", [store.ids["P1"], store.ids["P2"]])
    assert list(records.columns) == [
        "subject",
        "variant",
        "objective",
        "benchmark",
        "metric",
        "seed",
        "value",
    ]
    teacher = records[records["subject"] == "teacher"]
    assert len(teacher) == 2  # math + instruction of one run, though two kedro runs evaluated it
    assert teacher.set_index("metric").loc["exact_match", "value"] == 0.90  # the latest evaluation
    assert set(teacher["seed"]) == {"0"}  # seed of the kedro run that trained it (P1)
    cell = records[(records["subject"] == "vanilla.fkl") & (records["metric"] == "exact_match")]
    assert dict(zip(cell["seed"], cell["value"], strict=True)) == {"0": 0.40, "1": 0.42}
    assert not any("evaluated in runs" in message for message in caplog.messages)


def test_a_repeated_seed_keeps_the_latest_run_and_says_so(store, caplog):
    with caplog.at_level(logging.INFO, logger="warmup_distill_kedro.compare"):
        records = runs_records(store.uri)
    cell = records[(records["subject"] == "vanilla.fkl") & (records["metric"] == "exact_match")]
    assert dict(zip(cell["seed"], cell["value"], strict=True)) == {"0": 0.10, "1": 0.42}  # P3 replaced P1
    warnings = [message for message in caplog.messages if "evaluated in runs" in message]
    assert len(warnings) == 1
    assert "vanilla.fkl with seed 0" in warnings[0] and store.ids["P3"] in warnings[0]


def test_restricting_to_one_kedro_run(store):
    records = runs_records(store.uri, parent_run_ids=[store.ids["P2"]])
    # P2's own cells, and the teacher it evaluated (its evaluation.parent_run_id is P2)
    assert sorted(records["subject"].unique()) == ["teacher", "vanilla.fkl", "warmup.fkl"]
    assert set(records.loc[records["subject"] != "teacher", "seed"]) == {"1"}


def test_a_run_without_seed_counts_by_its_kedro_run(store):
    records = runs_records(store.uri, "no-seed")
    assert list(records["seed"]) == [store.ids["Q1"]]


def test_compare_table_values_over_two_training_seeds(store):
    table, markdown = compare_table(store.uri, "warmup-distill", [store.ids["P1"], store.ids["P2"]])
    vanilla = row(table, "fkl", "vanilla", "math", "exact_match")
    assert (vanilla["mean"], vanilla["n_seeds"]) == (pytest.approx(0.41), 2)
    assert vanilla["std"] == pytest.approx(0.02 / math.sqrt(2))
    warmup = row(table, "fkl", "warmup", "math", "exact_match")
    assert warmup["mean"] == pytest.approx(0.46) and warmup["std"] == pytest.approx(0.04 / math.sqrt(2))
    delta = row(table, "fkl", "warmup-vanilla", "math", "exact_match")
    assert delta["mean"] == pytest.approx(0.05)
    assert delta["std"] == pytest.approx(math.sqrt((0.02**2 + 0.04**2) / 2))
    # average per training seed: vanilla 0.45 (seed 0) and 0.44 (seed 1); warmup 0.48 and 0.49
    average = row(table, "fkl", "vanilla", "average", "score")
    assert average["mean"] == pytest.approx(0.445) and average["std"] == pytest.approx(0.01 / math.sqrt(2))
    assert row(table, "fkl", "warmup-vanilla", "average", "score")["mean"] == pytest.approx(0.04)
    assert row(table, "fkl", "vanilla", "distribution", "heldout_kl")["mean"] == pytest.approx(0.13)
    teacher = row(table, "teacher", "teacher", "math", "exact_match")
    assert (teacher["mean"], teacher["n_seeds"]) == (pytest.approx(0.90), 1)
    assert list(dict.fromkeys(table["objective"])) == ["teacher", "before_kd", "fkl"]
    assert "2 training seed(s)" in markdown
    assert "| fkl       | 41.0 ± 1.4" in markdown
    assert "instruction: mean ± std over 2 training seeds (0, 1)" in markdown


def test_an_objective_no_run_has_is_missing(store):
    table, markdown = compare_table(
        store.uri, "warmup-distill", [store.ids["P1"], store.ids["P2"]], objectives=["fkl", "rkl"]
    )
    rkl = table[table["objective"] == "rkl"]
    assert set(rkl["variant"]) == {"vanilla", "warmup", "warmup-vanilla"}
    assert (rkl["status"] == "missing").all() and rkl["mean"].isna().all()
    assert "Missing cells (no evaluation found): vanilla/rkl, warmup/rkl" in markdown


def test_named_variants_and_objectives_select_what_is_shown(store):
    table, _ = compare_table(
        store.uri,
        "warmup-distill",
        [store.ids["P1"], store.ids["P2"]],
        variants=["warmup"],
        objectives=["rkl"],
    )
    assert set(table["objective"]) == {"teacher", "before_kd", "rkl"}
    assert set(table["variant"]) == {"teacher", "warmup"}  # no vanilla, so no warmup-vanilla delta


def test_empty_store_or_experiment_says_how_to_produce_runs(store, tmp_path):
    with pytest.raises(
        ValueError, match=r"experiment 'empty' of the store sqlite:///.*kedro run --pipelines="
    ):
        runs_records(store.uri, "empty")
    with pytest.raises(ValueError, match=r"no MLflow experiment 'nope'"):
        runs_records(store.uri, "nope")
    missing_db = tmp_path / "absent" / "mlflow.db"
    with pytest.raises(ValueError, match=r"no MLflow store at .*absent/mlflow.db"):
        runs_records(f"sqlite:///{missing_db}")
    assert not missing_db.parent.exists()  # looking did not create an empty store
    with pytest.raises(ValueError, match=r"among the runs \['not-a-run'\]"):
        runs_records(store.uri, parent_run_ids=["not-a-run"])


def test_an_evaluated_run_without_variant_tag_is_named(store):
    with pytest.raises(
        ValueError, match=rf"run {store.ids['B1.cell']} \(vanilla.fkl\): tag 'evaluation.variant'"
    ):
        runs_records(store.uri, "broken")


def test_cli_writes_markdown_and_csv_and_refuses_to_overwrite(store, tmp_path):
    prefix = tmp_path / "reports" / "comparison"
    args = ["compare", "--run", store.ids["P1"], "--run", store.ids["P2"], "--objectives", "fkl,rkl"]
    result = CliRunner().invoke(
        commands, [*args, "--output", str(prefix)], env={"MLFLOW_TRACKING_URI": store.uri}
    )
    assert result.exit_code == 0, result.output
    assert "| fkl       | 41.0 ± 1.4" in result.output
    written = prefix.with_name("comparison.md").read_text()
    assert "vanilla/rkl" in written and "±" in written
    csv = pd.read_csv(prefix.with_name("comparison.csv"))
    assert row(csv, "fkl", "warmup-vanilla", "math", "exact_match")["mean"] == pytest.approx(0.05)
    assert (csv.loc[csv["objective"] == "rkl", "status"] == "missing").all()

    again = CliRunner().invoke(commands, [*args, "--tracking-uri", store.uri, "--output", str(prefix)])
    assert again.exit_code != 0
    assert "comparison.md" in again.output and "already exist" in again.output
    assert prefix.with_name("comparison.md").read_text() == written


def test_cli_reports_an_empty_experiment_as_an_error(store):
    result = CliRunner().invoke(commands, ["compare", "--tracking-uri", store.uri, "--experiment", "empty"])
    assert result.exit_code == 1
    assert "Error: no evaluated runs" in result.output and "'empty'" in result.output
    bad = CliRunner().invoke(commands, ["compare", "--tracking-uri", store.uri, "--variants", " , "])
    assert bad.exit_code == 2 and "--variants" in bad.output


def test_module_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, "-m", "warmup_distill_kedro.compare", "--help"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"},
    )
    assert result.returncode == 0, result.stderr
    assert "--objectives" in result.stdout and "--output" in result.stdout


def test_notebook_code_cells_build_the_comparison(store, tmp_path, monkeypatch):
    """The notebook's cells in this process, so that their values can be checked."""
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4
    cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in cells)
    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    (project / "pyproject.toml").write_text('[tool.kedro]\npackage_name = "warmup_distill_kedro"\n')
    monkeypatch.chdir(project / "notebooks")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    # the notebook sets MLflow's global tracking URI; put it back afterwards
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    namespace: dict = {"__name__": "__notebook__"}
    for cell in cells:
        exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), namespace)

    assert namespace["root"] == project.resolve()
    table = namespace["table"]
    assert row(table, "fkl", "vanilla", "math", "exact_match")["n_seeds"] == 2
    assert row(table, "fkl", "warmup-vanilla", "math", "exact_match")["status"] == "ok"
    assert row(table, "teacher", "teacher", "math", "exact_match")["mean"] == pytest.approx(0.90)
    assert len(namespace["figure"].get_axes()) == 3
    side_by_side = namespace["fkl_side_by_side"]
    assert list(side_by_side.columns) == ["vanilla", "warmup"]
    # one value per training seed of the selected group: P3 replaced P1's vanilla.fkl for seed 0
    assert side_by_side.loc[("exact_match", "count"), "vanilla"] == 2
    assert side_by_side.loc[("exact_match", "mean"), "vanilla"] == pytest.approx(0.26)
    assert side_by_side.loc[("exact_match", "mean"), "warmup"] == pytest.approx(0.46)


# ------------------------------------------------------------------------------------ groups of runs
@pytest.fixture(scope="module")
def groups(store) -> Store:
    """Experiment "groups": the demo (env local, config A) with seeds 0 and 1, a smoke run of the test
    environment (config T) that ended last, and a local run with another temperature (config C)."""
    exp = store.experiment("groups")
    kinds = {
        "D0": ("local", "aaaa1111", "2", 0, 1_000, 0.40),
        "X2": ("local", "cccc3333", "1", 2, 2_000, 0.90),
        "D1": ("local", "aaaa1111", "2", 1, 3_000, 0.44),
        "T0": ("test", "bbbb2222", "2", 0, 9_000, 0.00),
    }
    for name, (env, config, temperature, seed, start, value) in kinds.items():
        tags = {"kedro.env": env, "config": config}
        store.run(exp, name, start, seed=seed, tags=tags, params={"distill.temperature": temperature})
        for subject in ("teacher/teacher/teacher", "vanilla.fkl/vanilla/fkl", "warmup.fkl/warmup/fkl"):
            metrics = {MATH: value + (0.02 if subject.startswith("warmup") else 0.0), INSTRUCTION: 0.5}
            store.run(exp, f"{name}.{subject.split('/')[0]}", start + 100, parent=name, evaluated=subject,
                      metrics=metrics, tags=tags)  # fmt: skip
    return store


def test_runs_that_differ_in_anything_but_the_seed_are_never_pooled(groups):
    """The newest group by default (here the test run); --env picks the newest group of an environment."""
    newest = select_runs(groups.uri, "groups")
    assert (newest.group.env, newest.group.config) == ("test", "bbbb2222")
    assert set(newest.records["value"][newest.records["metric"] == "exact_match"]) == {0.0, 0.02}
    local = select_runs(groups.uri, "groups", env="local")
    assert (local.group.config, set(local.group.parents)) == (
        "aaaa1111",
        {groups.ids["D0"], groups.ids["D1"]},
    )
    cell = local.records[
        (local.records["subject"] == "vanilla.fkl") & (local.records["metric"] == "exact_match")
    ]
    assert dict(zip(cell["seed"], cell["value"], strict=True)) == {"0": 0.40, "1": 0.44}  # never X2's 0.90
    assert [g.config for g in local.other_groups] == ["bbbb2222", "cccc3333"]
    other = select_runs(groups.uri, "groups", config="cccc")
    assert other.group.parents == (groups.ids["X2"],)


def test_the_parent_runs_of_each_column_are_printed(groups):
    table, markdown = compare_table(groups.uri, "groups", env="local")
    assert row(table, "fkl", "vanilla", "math", "exact_match")["n_seeds"] == 2
    runs = markdown[markdown.index("## Runs") :]
    for column in ("teacher", "vanilla", "warmup"):
        [line] = [line for line in runs.splitlines() if line.startswith(f"- {column}:")]
        assert groups.ids["D0"] in line and groups.ids["D1"] in line and groups.ids["X2"] not in line
    assert "environment 'local', configuration aaaa1111 (2 kedro run(s))" in runs
    assert "environment 'test', configuration bbbb2222" in runs  # another group, named, not pooled


@pytest.mark.parametrize(
    ("names", "says"),
    [
        (("D0", "T0"), r"(?s)2 configurations.*kedro\.env: test vs local"),
        (("D1", "X2"), r"(?s)2 configurations.*distill\.temperature: 2 vs 1"),
    ],
)
def test_asking_to_mix_groups_is_refused(groups, names, says):
    with pytest.raises(MixedRunsError, match=says):
        select_runs(groups.uri, "groups", [groups.ids[name] for name in names])
    result = CliRunner().invoke(
        commands, ["compare", "--tracking-uri", groups.uri, "--experiment", "groups",
                   *(arg for name in names for arg in ("--run", groups.ids[name]))],
    )  # fmt: skip
    assert result.exit_code == 1 and "never pools" in result.output


def test_the_table_alone_goes_to_stdout(groups):
    result = CliRunner().invoke(
        commands, ["compare", "--tracking-uri", groups.uri, "--experiment", "groups", "--env", "local"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# Warmup-Distill comparison")
    assert "kedro compare:" not in result.stdout
    assert "kedro compare: environment 'local', configuration aaaa1111" in result.stderr


def test_the_notebook_runs_in_a_kernel(store, tmp_path, monkeypatch):
    """notebooks/compare_runs.ipynb as a user runs it (nbclient, a Python kernel), on the store's one group."""
    import nbclient
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    (project / "pyproject.toml").write_text('[tool.kedro]\npackage_name = "warmup_distill_kedro"\n')
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.setenv("KEDRO_DISABLE_TELEMETRY", "true")
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(project / "notebooks")}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    printed = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "runs: environment 'unknown'" in printed and "(3 kedro run(s))" in printed  # P1, P2, P3
    shown = [
        o["data"].get("text/markdown", "")
        for c in notebook.cells
        for o in c.get("outputs", [])
        if "data" in o
    ]
    assert any(
        markdown.startswith("# Warmup-Distill comparison") and "## Runs" in markdown for markdown in shown
    )
    side_by_side = notebook.cells[-1].outputs[0]["data"]["text/plain"]
    assert "exact_match" in side_by_side and "vanilla" in side_by_side
