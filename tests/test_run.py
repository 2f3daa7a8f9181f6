"""End to end through a KedroSession: the demo flow at test size (`conf/test`), and `--env gpu` on local
checkpoints and a user's file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from tests.helpers import TEST_DATA, version_folders
from warmup_distill_kedro.core.models.modeling import ModelSize, build_model
from warmup_distill_kedro.core.models.tokenization import TokenizerConfig, train_bpe_tokenizer
from warmup_distill_kedro.datasets import COMPLETE_MARKER
from warmup_distill_kedro.hooks.inputs import MissingInputsError


def _run(project: Path, pipelines: list[str], env: str = "test", **runtime_params) -> None:
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=env, runtime_params=runtime_params or None) as session:
        session.run(pipeline_names=pipelines)


def _latest(versioned: Path) -> Path:
    """The file or folder of the newest version of a versioned dataset."""
    return version_folders(versioned)[-1] / versioned.name


def _assert_explained(project: Path, subjects: list[str]) -> None:
    """After a whole flow (`__default__`, grid vanilla and warmup x fkl and js): every subject's token
    records, the changes after KD and after warmup, the explain plots embedded in the report by links that
    resolve from its file, and the tables and plots as artifacts of the MLflow run."""
    reporting = project / TEST_DATA / "08_reporting"
    for subject in subjects:
        records = pd.read_parquet(
            _latest(project / f"{TEST_DATA}/07_model_output/explain/{subject}.explain_tokens.parquet")
        )
        assert len(records) > 0 and (records["subject"] == subject).all() and (records["kl"] >= -1e-6).all()
    changes = pd.read_csv(_latest(reporting / "explain/explain_changes.csv"))
    distilled = [s for s in subjects if not s.endswith("before_kd") and s != "teacher"]
    assert set(changes["comparison"]) == {*distilled, "warmup.before_kd", "control.before_kd"}
    for plot in ("explain_fkl", "explain_js", "explain_warmup"):
        assert _latest(reporting / f"report_{plot}.png").stat().st_size > 1000, plot
    markdown = _latest(reporting / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown[markdown.index("## What distillation moved") :])
    assert len(links) == 3 and all(
        (_latest(reporting / "report.md").parent / link).is_file() for link in links
    )
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["warmup-distill"], output_format="list")
    [explained] = [r for r in runs if r.data.tags.get("kedro.pipelines") == "__default__"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(explained.info.run_id)}
    assert {
        "explain_changes.csv",
        "report_explain_fkl_plot.png",
        "report_explain_warmup_plot.png",
    } <= artifacts


def test_bootstrap_end_to_end(project_copy: Path) -> None:
    _run(project_copy, ["data", "bootstrap"])

    for split in ("train", "validation", "test"):
        assert (project_copy / f"{TEST_DATA}/03_primary/{split}_examples.parquet").is_file()
    for name in ("teacher_model", "student_model", "student_tokenizer"):
        versions = version_folders(project_copy / f"{TEST_DATA}/06_models" / name)
        assert len(versions) == 1, name
        checkpoint = versions[0] / name
        assert (checkpoint / COMPLETE_MARKER).is_file()
    assert (
        version_folders(project_copy / f"{TEST_DATA}/06_models/teacher_model")[0]
        / "teacher_model/config.json"
    ).is_file()

    summary_file = next(
        (project_copy / f"{TEST_DATA}/08_reporting/bootstrap_summary.json").glob("*/bootstrap_summary.json")
    )
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
    # Run names tell runs apart in MLflow's list: pipelines, environment, grid, seed; node and environment.
    assert parents[0].info.run_name == "data+bootstrap · test · vanilla+warmup × fkl+js · seed 0"
    assert sorted(r.info.run_name for r in children) == ["sft_student · test", "sft_teacher · test"]
    assert {r.data.tags["config"] for r in runs} == {parents[0].data.tags["config"]}
    teacher_run = next(r for r in children if r.data.tags["kedro.node"] == "sft_teacher")
    assert "loss" in teacher_run.data.metrics and "eval/validation_nll" in teacher_run.data.metrics
    history = mlflow.tracking.MlflowClient().get_metric_history(teacher_run.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4, 6]  # log_every 2 over 6 steps
    saved_version = version_folders(project_copy / f"{TEST_DATA}/06_models/teacher_model")[0].name
    assert parents[0].data.tags["version.save.teacher_model"] == saved_version


def test_bootstrap_alone_reuses_the_latest_splits(project_copy: Path) -> None:
    _run(project_copy, ["data"])
    _run(project_copy, ["bootstrap"])
    assert len(version_folders(project_copy / f"{TEST_DATA}/06_models/student_model")) == 1


def test_a_bad_parameter_fails_before_any_node_runs(project_copy: Path) -> None:
    with pytest.raises(Exception, match=r"(?s)bootstrap\.teacher.*max_steps") as error:
        _run(project_copy, ["data", "bootstrap"], bootstrap={"teacher": {"training": {"max_steps": 0}}})
    assert "greater than 0" in str(error.value)
    assert not (project_copy / f"{TEST_DATA}/02_intermediate/examples.parquet").exists()


def _save_hugging_face_folder(folder: Path, hidden_size: int, tokenizer, padding_rows: int = 0) -> None:
    """A checkpoint laid out as on the Hub: weights, config and tokenizer files in one folder; with
    embedding rows no token uses, as Qwen2.5 pads 151665 ids to 151936 (1.5B) or 152064 (7B) rows."""
    model = build_model(
        ModelSize(hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        tokenizer,
        seed=0,
    )
    if padding_rows:
        model.resize_token_embeddings(len(tokenizer) + padding_rows)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_gpu_env_reads_local_checkpoints_and_a_users_file(project_copy: Path) -> None:
    raw = project_copy / "data/01_raw"
    raw.mkdir(parents=True)
    problems = [
        {
            "question": f"Tom has {a} apples and buys {b} more. How many now?",
            "answer": f"{a} + {b} = {a + b}\n#### {a + b}",
        }
        for a in range(1, 11)
        for b in range(1, 4)
    ]
    (raw / "math.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    tokenizer = train_bpe_tokenizer(
        [p["question"] + p["answer"] for p in problems], TokenizerConfig(vocab_size=300)
    )
    _save_hugging_face_folder(project_copy / "teacher", 32, tokenizer, padding_rows=13)
    _save_hugging_face_folder(project_copy / "student", 16, tokenizer, padding_rows=5)
    runtime_params = {
        "teacher_checkpoint": str(project_copy / "teacher"),
        "student_checkpoint": str(project_copy / "student"),
        "train_file": str(raw / "math.jsonl"),
        # small budgets for the stages after data (their sizes are not what this test is about)
        "probe": {"n_samples": 1, "max_new_tokens": 6, "max_prompts": 4, "show_progress": False},
        "check": {"tau": 0.5, "continuation": {"max_new_tokens": 6, "show_progress": False}},
        "warmup": {"training": {"max_steps": 2, "batch_size": 2, "warmup_steps": 0, "eval_every": 0}},
        "distill": {
            "objectives": ["fkl"],
            "data": {"max_examples": 4},
            "training": {"max_steps": 1, "batch_size": 2, "warmup_steps": 0, "eval_every": 0},
            "validation_examples": 2,
        },
        "evaluate": {
            "rouge_seeds": [0],
            "sampling": {"max_new_tokens": 6, "show_progress": False},
            "heldout_examples": 2,
            "check_prompts": 2,
        },
    }

    bootstrap_project(project_copy)
    with KedroSession.create(project_path=project_copy, env="gpu", runtime_params=runtime_params) as session:
        session.run(pipeline_names=["from_checkpoints"])
    with KedroSession.create(project_path=project_copy, env="gpu", runtime_params=runtime_params) as session:
        catalog = session.load_context().catalog
        splits = [catalog.load(f"{split}_examples") for split in ("train", "validation", "test")]
        teacher, student = catalog.load("teacher_model"), catalog.load("student_model")

    assert sum(len(s) for s in splits) == len(problems)
    assert set(splits[0]["task"]) == {"math"}
    assert teacher.model.config.hidden_size == 32 and student.model.config.hidden_size == 16
    assert teacher.model.dtype == torch.bfloat16  # load_args of the gpu catalog
    # Different padded vocabularies: distill (run above) compared only the rows both tokenizers use.
    assert teacher.model.get_output_embeddings().out_features == len(tokenizer) + 13
    assert student.model.get_output_embeddings().out_features == len(tokenizer) + 5
    text = "Tom has 7 apples and buys 3 more."
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    for checkpoint in (teacher, student):
        assert checkpoint.tokenizer(text, add_special_tokens=False)["input_ids"] == expected
    # Bootstrap did not run; the stages after it did, from the given checkpoints.
    assert not (project_copy / "data/gpu/06_models/teacher_model").exists()
    assert not (project_copy / "data/gpu/06_models/student_tokenizer").exists()
    # The gpu environment writes under its own data root (conf/gpu/globals.yml), never into the demo's.
    assert not (project_copy / "data/03_primary").exists() and not (project_copy / "data/06_models").exists()
    warmup = _latest(project_copy / "data/gpu/06_models/student_warmup")
    started_from = json.loads((warmup / "checkpoint_meta.json").read_text())["started_from"]
    assert started_from["path"] == started_from["source"] == str(project_copy / "student")


def test_probe_check_warmup_end_to_end(project_copy: Path) -> None:
    _run(project_copy, ["data", "bootstrap"])
    # The test teacher gives the student's tokens p = 0.002 to 0.01 (about 1/300, its vocabulary): tau 0.003
    # flags some of them and not others, so first flags fall after the start and the prefix is kept.
    _run(project_copy, ["probe", "check", "warmup"], check={"tau": 0.003})

    rollouts = pd.read_parquet(_latest(project_copy / f"{TEST_DATA}/07_model_output/rollouts.parquet"))
    assert len(rollouts) == 6 * 2  # conf/test: 6 prompts x 2 samples
    for column in ("prompt_id", "prompt", "response", "sample_index", "token_ids", "logprobs", "finished"):
        assert column in rollouts, column
    assert all(
        len(ids) == len(lp) for ids, lp in zip(rollouts["token_ids"], rollouts["logprobs"], strict=True)
    )

    corrected = pd.read_parquet(_latest(project_copy / f"{TEST_DATA}/07_model_output/corrected_set.parquet"))
    summary = json.loads(_latest(project_copy / f"{TEST_DATA}/08_reporting/check_summary.json").read_text())
    assert summary["n_rollouts"] == len(rollouts)
    assert summary["n_pairs"] == len(corrected) > 0
    assert (corrected["chosen"] != corrected["rejected"]).all()
    _assert_corrections_keep_the_prefix(
        pd.read_parquet(_latest(project_copy / f"{TEST_DATA}/07_model_output/scored_rollouts.parquet")),
        corrected,
        0.003,
    )
    assert (
        _latest(project_copy / f"{TEST_DATA}/08_reporting/teacher_prob_histogram.png").stat().st_size > 1000
    )
    warmup = _latest(project_copy / f"{TEST_DATA}/06_models/student_warmup")
    assert (warmup / COMPLETE_MARKER).is_file()
    assert json.loads((warmup / "checkpoint_meta.json").read_text())["stage"] == "warmup"
    control = json.loads(
        (
            _latest(project_copy / f"{TEST_DATA}/06_models/student_control") / "checkpoint_meta.json"
        ).read_text()
    )
    warmup_meta = json.loads((warmup / "checkpoint_meta.json").read_text())
    assert control["stage"] == "warmup_control" and control["steps"] == warmup_meta["steps"]
    control_metrics = json.loads(
        _latest(project_copy / f"{TEST_DATA}/08_reporting/control_metrics.json").read_text()
    )
    assert control_metrics["rows"] == summary["n_pairs"]  # one gold row per warmup pair: the same prompts

    mlflow.set_tracking_uri(f"sqlite:///{project_copy / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["warmup-distill"], output_format="list")
    warmup_run = next(r for r in runs if r.data.tags.get("kedro.node") == "warmup_student")
    for metric in ("loss", "reward_margin", "preference_accuracy", "chosen_logp", "rejected_logp"):
        assert metric in warmup_run.data.metrics, metric
    control_run = next(r for r in runs if r.data.tags.get("kedro.node") == "control_student")
    assert "nll" in control_run.data.metrics and control_run.data.tags["stage"] == "control"

    _run(project_copy, ["warmup"])  # alone, on the latest corrected set
    assert len(version_folders(project_copy / f"{TEST_DATA}/06_models/student_warmup")) == 2


def _assert_corrections_keep_the_prefix(scored: pd.DataFrame, corrected: pd.DataFrame, tau: float) -> None:
    """Each pair rejects the student's response as sampled and keeps its text before the first token the
    teacher gave p < tau; some first flags come after the start (else a lost prefix would pass)."""
    first_flag_chars = {}
    for row in scored.itertuples():
        flags = np.exp(row.teacher_logprobs.astype(np.float64)) < tau
        np.testing.assert_array_equal(row.flags, flags)
        first = int(np.flatnonzero(flags)[0]) if flags.any() else -1
        assert row.first_flag == first
        flag_char = row.teacher_char_starts[first] if first >= 0 else None
        first_flag_chars[(row.prompt_id, row.sample_index)] = (row.response, flag_char)
    for pair in corrected.itertuples():
        response, flag_char = first_flag_chars[(pair.prompt_id, pair.sample_index)]
        assert (pair.rejected, pair.flag_char) == (response, flag_char)
        assert pair.chosen.startswith(response[:flag_char])
    assert (corrected["flag_char"] > 0).sum() >= 3


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"check": {"tau": 1.5}}, r"(?s)check.*tau must be in \(0, 1\) for rule 'teacher_prob'"),
        ({"check": {"rule": "entropy"}}, r"(?s)check.*rule"),
        ({"warmup": {"loss": {"loss": "ipo"}}}, r"(?s)warmup.*loss"),
        ({"probe": {"n_samples": 0}}, r"(?s)probe.*n_samples"),
        ({"distill": {"objectives": ["fkl", "kl2"]}}, r"(?s)distill.*unknown \['kl2'\]; choose from"),
        ({"distill": {"options": {"js": {"beta": 0.0}}}}, r"(?s)distill.*options\.js.*beta"),
    ],
)
def test_bad_stage_parameters_fail_before_any_node(project_copy: Path, params, message) -> None:
    with pytest.raises(Exception, match=message):
        _run(project_copy, ["probe", "check", "warmup", "distill"], **params)
    assert not (project_copy / f"{TEST_DATA}/07_model_output").exists()


def test_a_bad_explain_parameter_fails_before_any_node(project_copy: Path) -> None:
    with pytest.raises(Exception, match=r"(?s)explain.*examples.*greater than 0"):
        _run(project_copy, ["explain"], explain={"examples": 0})
    assert not (project_copy / f"{TEST_DATA}/07_model_output").exists()


def test_probe_and_check_are_deterministic(project_copy: Path) -> None:
    """Same seeds, same inputs: identical rollouts, teacher scores and corrected sets, run after run."""
    _run(project_copy, ["data", "bootstrap"])
    _run(project_copy, ["probe", "check"])
    _run(project_copy, ["probe", "check"])
    for name in ("rollouts", "scored_rollouts", "corrected_set"):
        first, second = version_folders(project_copy / f"{TEST_DATA}/07_model_output/{name}.parquet")
        pd.testing.assert_frame_equal(
            pd.read_parquet(first / f"{name}.parquet"), pd.read_parquet(second / f"{name}.parquet")
        )
    summaries = [
        json.loads((v / "check_summary.json").read_text())
        for v in version_folders(project_copy / f"{TEST_DATA}/08_reporting/check_summary.json")
    ]
    assert summaries[0] == summaries[1]


def test_distill_grid_and_a_single_cell(project_copy: Path) -> None:
    _run(project_copy, ["data", "bootstrap", "probe", "check", "warmup"])
    _run(project_copy, ["distill"])  # conf/test: variants vanilla, warmup x objectives fkl, js
    cells = [f"{v}.{o}" for v in ("vanilla", "warmup") for o in ("fkl", "js")]
    for cell in cells:
        checkpoint = _latest(project_copy / f"{TEST_DATA}/06_models/distilled/{cell}.student")
        meta = json.loads((checkpoint / "checkpoint_meta.json").read_text())
        assert (meta["variant"], meta["objective"]) == tuple(cell.split("."))
        assert _latest(
            project_copy / f"{TEST_DATA}/08_reporting/distill/{cell}.distill_metrics.json"
        ).is_file()
    mlflow.set_tracking_uri(f"sqlite:///{project_copy / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["warmup-distill"], output_format="list")
    distill_runs = [r for r in runs if r.data.tags.get("stage") == "distill"]
    assert sorted(f"{r.data.tags['variant']}.{r.data.tags['objective']}" for r in distill_runs) == sorted(
        cells
    )
    assert all("kd" in r.data.metrics and "eval/validation_kl" in r.data.metrics for r in distill_runs)

    _run(project_copy, ["distill"], distill={"variants": ["warmup"], "objectives": ["fkl"]})
    # The equal-step SFT baseline from the fairness-control student: no teacher in the loss.
    _run(project_copy, ["distill"], distill={"variants": ["control"], "objectives": ["sft"]})
    checkpoint = _latest(project_copy / f"{TEST_DATA}/06_models/distilled/control.sft.student")
    assert json.loads((checkpoint / "checkpoint_meta.json").read_text())["loss"] is None
    metrics = json.loads(
        _latest(
            project_copy / f"{TEST_DATA}/08_reporting/distill/control.sft.distill_metrics.json"
        ).read_text()
    )
    assert metrics["steps"] == 2 and "final_validation_kl" in metrics
    assert [record["step"] for record in metrics["history"] if "loss" in record] == [1.0, 2.0]
    assert len(version_folders(project_copy / f"{TEST_DATA}/06_models/distilled/warmup.fkl.student")) == 2
    assert len(version_folders(project_copy / f"{TEST_DATA}/06_models/distilled/vanilla.fkl.student")) == 1


def test_a_teacher_with_its_own_tokenizer(project_copy: Path) -> None:
    own_tokenizer = {"bootstrap": {"tokenizers": {"teacher": {"vocab_size": 280}}}}
    _run(project_copy, ["data", "bootstrap", "probe", "check", "warmup"], **own_tokenizer)

    teacher_vocab = json.loads(
        (_latest(project_copy / f"{TEST_DATA}/06_models/teacher_tokenizer") / "tokenizer.json").read_text()
    )
    student_vocab = json.loads(
        (_latest(project_copy / f"{TEST_DATA}/06_models/student_tokenizer") / "tokenizer.json").read_text()
    )
    assert len(teacher_vocab["model"]["vocab"]) != len(student_vocab["model"]["vocab"])
    scored = pd.read_parquet(_latest(project_copy / f"{TEST_DATA}/07_model_output/scored_rollouts.parquet"))
    # The teacher read the responses in its own tokens, mapped back to the text by character offsets.
    assert any(
        list(t)[: len(s)] != list(s)
        for t, s in zip(scored["teacher_token_ids"], scored["token_ids"], strict=True)
    )
    for row in scored.itertuples():
        assert len(row.teacher_logprobs) == len(row.teacher_token_ids) == len(row.flags)
        assert all(0 <= start <= len(row.response) for start in row.teacher_char_starts)
    assert (
        len(pd.read_parquet(_latest(project_copy / f"{TEST_DATA}/07_model_output/corrected_set.parquet"))) > 0
    )

    with pytest.raises(Exception, match=r"tokenizers differ.*dskd_cma"):
        _run(project_copy, ["distill"])


@pytest.mark.parametrize("mode", ["on_policy", "adaptive", "sequence_kd"])
def test_distill_data_modes(project_copy: Path, mode: str) -> None:
    _run(project_copy, ["data", "bootstrap"])
    data = {"mode": mode, "lmbda": 1.0, "initial_threshold": 1.0, "sampling": {"max_new_tokens": 4}}
    _run(project_copy, ["distill"], distill={"variants": ["vanilla"], "objectives": ["fkl"], "data": data})

    metrics = json.loads(
        _latest(
            project_copy / f"{TEST_DATA}/08_reporting/distill/vanilla.fkl.distill_metrics.json"
        ).read_text()
    )
    assert metrics["data_mode"] == mode
    kd_examples = pd.read_parquet(_latest(project_copy / f"{TEST_DATA}/05_model_input/kd_examples.parquet"))
    if mode == "sequence_kd":  # the teacher's own responses replace the gold ones
        assert (kd_examples["response"] != kd_examples["gold_response"]).any()
        assert not kd_examples["finished"].all()  # 4 new tokens: cut responses, marked (and given no EOS)
        assert "batches_sampled" not in metrics
    else:
        assert (kd_examples["response"] == kd_examples["gold_response"]).all()
        assert metrics["batches_sampled"] >= 1 and metrics["batches_gold"] == 0


@pytest.mark.parametrize(("objective", "own_teacher_tokenizer"), [("dskd", False), ("dskd_cma", True)])
def test_dual_space_cells(project_copy: Path, objective: str, own_teacher_tokenizer: bool) -> None:
    tokenizers = {"teacher": {"vocab_size": 280}} if own_teacher_tokenizer else {"teacher": None}
    _run(project_copy, ["data", "bootstrap"], bootstrap={"tokenizers": tokenizers})
    cell = {"variants": ["vanilla"], "objectives": [objective], "options": {objective: {"pretrain_steps": 2}}}
    _run(project_copy, ["distill"], distill=cell)

    checkpoint = _latest(project_copy / f"{TEST_DATA}/06_models/distilled/vanilla.{objective}.student")
    assert json.loads((checkpoint / "checkpoint_meta.json").read_text())["loss"]["projector_lr"] == 1e-3
    assert (checkpoint / "config.json").is_file()  # the plain student, without its projectors
    metrics = json.loads(
        _latest(
            project_copy / f"{TEST_DATA}/08_reporting/distill/vanilla.{objective}.distill_metrics.json"
        ).read_text()
    )
    assert "final_validation_nll" in metrics
    assert ("final_validation_kl" in metrics) == (
        not own_teacher_tokenizer
    )  # no token-level KL across tokenizers
    mlflow.set_tracking_uri(f"sqlite:///{project_copy / 'mlflow.db'}")
    [run] = [
        r
        for r in mlflow.search_runs(experiment_names=["warmup-distill"], output_format="list")
        if r.data.tags.get("objective") == objective
    ]
    for metric in ("kd_student", "kd_teacher", "ce_t2s", "t2s_accuracy", "projector_pretraining/ce_t2s"):
        assert metric in run.data.metrics, metric


def test_the_whole_flow_ends_with_the_report(project_copy: Path) -> None:
    """`kedro run` (the default pipeline) at test size: every model evaluated, the table complete, the
    plots written, and each evaluation logged to the MLflow run that trained the model."""
    _run(project_copy, ["__default__"])

    reporting = project_copy / f"{TEST_DATA}/08_reporting"
    subjects = ["teacher", "vanilla.before_kd", "warmup.before_kd", "control.before_kd"] + [
        f"{v}.{o}" for v in ("vanilla", "warmup") for o in ("fkl", "js")
    ]
    _assert_explained(project_copy, subjects)
    evaluations = {
        s: json.loads(_latest(reporting / f"evaluation/{s}.evaluation_metrics.json").read_text())
        for s in subjects
    }
    for subject, evaluation in evaluations.items():
        assert evaluation["subject"] == subject
        assert 0.0 <= evaluation["math"]["exact_match"] <= 1.0 and evaluation["math"]["n_examples"] > 0
        assert sorted(evaluation["instruction"]["rouge_l_per_seed"]) == ["0", "1"]
        assert evaluation["distribution"]["heldout_nll"] > 0.0
        assert 0.0 <= evaluation["distribution"]["rejected_share"] <= 1.0
        predictions = pd.read_parquet(
            _latest(project_copy / f"{TEST_DATA}/07_model_output/evaluation/{subject}.predictions.parquet")
        )
        assert set(predictions["task"]) == {"math", "instruction"}
    assert evaluations["teacher"]["distribution"]["heldout_kl"] is None  # no KL to itself
    assert evaluations["warmup.fkl"]["distribution"]["heldout_kl"] >= 0.0

    # The test models score 0 on math and Rouge-L; their held-out NLLs tell every subject apart.
    assert len({e["distribution"]["heldout_nll"] for e in evaluations.values()}) == len(subjects)
    _assert_report_matches(pd.read_csv(_latest(reporting / "report.csv")), evaluations)
    compact = _latest(reporting / "report_compact.md").read_text()  # what `make demo` prints last
    assert "| math EM (%)" in compact and max(len(line) for line in compact.splitlines()) <= 100
    mlflow.set_tracking_uri(f"sqlite:///{project_copy / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["warmup-distill"], output_format="list")
    by_name = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    for run_name, subject in (("sft_teacher · test", "teacher"), ("warmup_student · test", "warmup.before_kd"),
                              ("warmup.fkl.distill · test · seed 0", "warmup.fkl")):  # fmt: skip
        assert by_name[run_name].data.tags["evaluation.subject"] == subject
    logged = {
        r.data.tags["evaluation.subject"]: {
            k: v for k, v in r.data.metrics.items() if k.startswith("evaluation.")
        }
        for r in runs
        if "evaluation.subject" in r.data.tags
    }
    assert logged == {
        subject: _numbers(evaluation, "evaluation") for subject, evaluation in evaluations.items()
    }
    # The parent keeps a summary (each model's headline scores); the details are on the models' own runs.
    [parent] = [r for r in runs if r.data.tags.get("kedro.pipelines") == "__default__"]
    assert parent.data.metrics["math.exact_match/warmup.fkl"] == pytest.approx(
        evaluations["warmup.fkl"]["math"]["exact_match"]
    )
    assert not [key for key in parent.data.metrics if "evaluation_metrics" in key]
    summary = [key for key in parent.data.metrics if "/" in key]
    assert len(summary) == 2 * len(subjects)

    # The report alone, on later versions of the evaluations with math and Rouge-L scores known, non-zero
    # and distinct per subject (and seed): every cell still equals its evaluation's numbers.
    rescored = _with_distinct_scores(evaluations)
    bootstrap_project(project_copy)
    with KedroSession.create(project_path=project_copy, env="test") as session:
        catalog = session.load_context().catalog
        for subject, evaluation in rescored.items():
            catalog.save(f"{subject}.evaluation_metrics", evaluation)
    _run(project_copy, ["report"])
    assert len(version_folders(reporting / "report.md")) == 2
    _assert_report_matches(pd.read_csv(_latest(reporting / "report.csv")), rescored)
    markdown = _latest(reporting / "report.md").read_text()
    assert "fkl" in markdown and "js" in markdown and "warmup" in markdown
    for plot in ("accuracy", "kd_curves", "warmup_mismatch"):
        assert _latest(reporting / f"report_{plot}.png").stat().st_size > 1000, plot


def _numbers(nested: dict, prefix: str) -> dict[str, float]:
    """The numeric leaves of an evaluation JSON, named as logged: `<prefix>.<key>.<key>`."""
    out = {}
    for key, value in nested.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(_numbers(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _with_distinct_scores(evaluations: dict[str, dict]) -> dict[str, dict]:
    """The evaluations with math 1/16, 2/16, ... and Rouge-L seeds i/32 and i/32 + i/64 (a std to check)."""
    rescored = {}
    for i, (subject, evaluation) in enumerate(evaluations.items(), start=1):
        per_seed = {"0": i / 32, "1": i / 32 + i / 64}
        values = list(per_seed.values())
        instruction = {
            "rouge_l": float(np.mean(values)),
            "rouge_l_std": float(np.std(values, ddof=1)),
            "rouge_l_per_seed": per_seed,
        }
        math = {**evaluation["math"], "exact_match": i / 16}
        rescored[subject] = {
            **evaluation,
            "math": math,
            "instruction": {**evaluation["instruction"], **instruction},
        }
    return rescored


def _expected_report(
    evaluations: dict[str, dict],
) -> dict[tuple[str, str, str, str], tuple[float, float, int]]:
    """(objective, variant, benchmark, metric) -> (mean, std, n_seeds), from the evaluations by hand: math
    is one greedy number, Rouge-L one per seed, their average combines the two means (different seeds, so
    the std is Rouge-L's halved), each distribution statistic is one number; warmup-vanilla and
    warmup-control differences."""
    expected = {}
    for evaluation in evaluations.values():
        cell = (evaluation["objective"], evaluation["variant"])
        math = evaluation["math"]["exact_match"]
        rouge = list(evaluation["instruction"]["rouge_l_per_seed"].values())
        expected[(*cell, "math", "exact_match")] = (math, 0.0, 1)
        if "flexible_match" in evaluation["math"]:  # the last number of the response: beside, not averaged
            expected[(*cell, "math", "flexible_match")] = (evaluation["math"]["flexible_match"], 0.0, 1)
        expected[(*cell, "instruction", "rouge_l")] = (np.mean(rouge), np.std(rouge, ddof=1), len(rouge))
        expected[(*cell, "average", "score")] = ((math + np.mean(rouge)) / 2, np.std(rouge, ddof=1) / 2, 1)
        for metric, value in evaluation["distribution"].items():
            if (
                metric in ("heldout_nll", "heldout_kl", "heldout_entropy", "rejected_share")
                and value is not None
            ):
                expected[(*cell, "distribution", metric)] = (value, 0.0, 1)
    for (objective, variant, benchmark, metric), (mean, std, n) in list(expected.items()):
        for subtrahend in ("vanilla", "control"):  # the control student exists before KD only
            other = expected.get((objective, subtrahend, benchmark, metric))
            if variant == "warmup" and other is not None:
                difference = (mean - other[0], np.hypot(std, other[1]), min(n, other[2]))
                expected[(objective, f"warmup-{subtrahend}", benchmark, metric)] = difference
    return expected


def _assert_report_matches(table: pd.DataFrame, evaluations: dict[str, dict]) -> None:
    """Every row of report.csv is one the evaluations imply, with their numbers; none is missing."""
    expected = _expected_report(evaluations)
    assert (table["status"] == "ok").all()
    cells = {
        (row.objective, row.variant, row.benchmark, row.metric): (row.mean, row.std, row.n_seeds)
        for row in table.itertuples()
    }
    assert len(cells) == len(table) and set(cells) == set(expected)
    for key, (mean, std, n_seeds) in expected.items():
        assert cells[key] == (pytest.approx(mean, abs=1e-12), pytest.approx(std, abs=1e-12), n_seeds), key


def test_a_non_finite_loss_stops_training_saves_nothing_and_fails_the_run(project_copy: Path) -> None:
    _run(project_copy, ["data"])
    exploding = {"student": {"training": {"learning_rate": 1e30, "max_steps": 20}}}
    with pytest.raises(
        Exception, match=r"sft student: non-finite loss .* at optimizer step \d+, micro-batch \d+"
    ):
        _run(project_copy, ["bootstrap"], bootstrap=exploding)
    student_versions = project_copy / f"{TEST_DATA}/06_models/student_model"
    assert not student_versions.exists() or not any(
        student_versions.glob(f"*/student_model/{COMPLETE_MARKER}")
    )
    assert not list((project_copy / f"{TEST_DATA}/09_training_state").glob("sft_student/*/*/state.pt"))

    mlflow.set_tracking_uri(f"sqlite:///{project_copy / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["warmup-distill"], output_format="list")
    student_run = next(r for r in runs if r.data.tags.get("kedro.node") == "sft_student")
    assert student_run.info.status == "FAILED"
    assert student_run.data.tags["error.type"] == "NonFiniteLossError"


def test_prompts_longer_than_max_length_stop_or_are_cut_and_counted(project_copy: Path) -> None:
    _run(project_copy, ["data"])
    short = {"student": {"max_length": 16}}
    with pytest.raises(Exception, match=r"prompt of \d+ tokens does not fit max_length 16.*keep_end"):
        _run(project_copy, ["bootstrap"], bootstrap=short)
    assert not (project_copy / f"{TEST_DATA}/06_models/student_model").exists() or not any(
        (project_copy / f"{TEST_DATA}/06_models/student_model").glob(f"*/student_model/{COMPLETE_MARKER}")
    )

    _run(
        project_copy, ["bootstrap"], bootstrap={"student": {"max_length": 16, "prompt_overflow": "keep_end"}}
    )
    metrics = json.loads(
        _latest(project_copy / f"{TEST_DATA}/08_reporting/student_sft_metrics.json").read_text()
    )
    assert metrics["truncated_prompts"] > 0  # cut by the declared policy, and counted
    assert metrics["truncated_prompts"] <= metrics["train_sequences"]


def test_each_environment_writes_under_its_own_data_root(project_copy: Path) -> None:
    """A run of one environment never becomes another's latest version, nor replaces its examples."""
    small = {"data": {"math": {"n_examples": 60}, "instruction": {"n_examples": 20}}}
    _run(project_copy, ["data"], env="local", **small)  # the default environment: data/
    demo_examples = project_copy / "data/02_intermediate/examples.parquet"
    demo = pd.read_parquet(demo_examples)
    _run(project_copy, ["data"])  # --env test: data/test/
    assert len(pd.read_parquet(project_copy / TEST_DATA / "02_intermediate/examples.parquet")) == 160
    pd.testing.assert_frame_equal(pd.read_parquet(demo_examples), demo)  # untouched
    assert len(demo) == 80
    assert sorted(p.name for p in (project_copy / "data").iterdir()) == [
        "02_intermediate",
        "03_primary",
        "test",
    ]


def test_missing_inputs_stop_the_run_before_any_node_naming_what_to_set(project_copy: Path) -> None:
    raw = project_copy / "data/01_raw"
    raw.mkdir(parents=True)
    (raw / "math.jsonl").write_text(json.dumps({"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    checkpoints = {
        "teacher_checkpoint": str(project_copy / "absent-teacher"),
        "student_checkpoint": str(project_copy / "absent-student"),
        "train_file": str(raw / "math.jsonl"),
    }
    bootstrap_project(project_copy)
    with (
        pytest.raises(MissingInputsError) as error,
        KedroSession.create(project_path=project_copy, env="gpu", runtime_params=checkpoints) as session,
    ):
        session.run(pipeline_names=["from_checkpoints"])
    message = str(error.value)
    assert "teacher_model: no such folder or file: " + checkpoints["teacher_checkpoint"] in message
    assert "set the parameter 'teacher_checkpoint', e.g. --params teacher_checkpoint=" in message
    assert "set the parameter 'student_checkpoint'" in message
    assert not (project_copy / "data/gpu").exists()  # build_examples and split_examples did not run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project_copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("warmup-distill")
    assert not client.search_runs([experiment.experiment_id])  # and no MLflow run was opened

    # An earlier stage's output that was never written: the stage to run first.
    with pytest.raises(
        MissingInputsError, match=r"student_model: no saved version under .*--pipelines=bootstrap"
    ):
        _run(project_copy, ["probe"])
    assert not (project_copy / TEST_DATA).exists()


def test_runs_of_one_configuration_share_their_config_tag(project_copy: Path) -> None:
    """Whatever pipelines run (Kedro validates, and fills in defaults for, only theirs) and whatever seed:
    `kedro compare` pools runs by this tag."""
    _run(project_copy, ["data"])
    _run(project_copy, ["data", "bootstrap"], distill={"seeds": [1]})
    _run(project_copy, ["data"], data={"split": {"validation_fraction": 0.2}})
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project_copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("warmup-distill")
    parents = [
        r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags
    ]
    by_name = {r.info.run_name: r.data.tags for r in parents}
    first = by_name["data · test · vanilla+warmup × fkl+js · seed 0"]
    seed_one = by_name["data+bootstrap · test · distill.seeds=[1]"]
    other = by_name["data · test · data.split.validation_fraction=0.2 · seed 0"]
    assert first["config"] == seed_one["config"] != other["config"]
    assert (first["seed"], seed_one["seed"]) == ("0", "1")


def test_several_training_seeds_train_evaluate_and_report_each_run(project_copy: Path) -> None:
    """`distill.seeds: [0, 1]`: each cell trained once per seed (its own versioned checkpoint and tracked run,
    tagged with the seed), each run evaluated, the report pooling them with intervals on its differences,
    and `kedro compare` reading the seeds back."""
    _run(project_copy, ["data", "bootstrap", "probe", "check", "warmup"])
    grid_params = {"distill": {"objectives": ["fkl", "sft"], "seeds": [0, 1]}}
    _run(project_copy, ["distill", "evaluate", "explain", "report"], **grid_params)
    models = project_copy / f"{TEST_DATA}/06_models/distilled"
    runs = [f"{v}.{o}.seed{s}" for v in ("vanilla", "warmup") for o in ("fkl", "sft") for s in (0, 1)]
    assert all(_latest(models / f"{run}.student").is_dir() for run in runs)
    history = {
        run: json.loads(
            _latest(project_copy / f"{TEST_DATA}/08_reporting/distill/{run}.distill_metrics.json").read_text()
        )["history"]
        for run in runs
    }
    # Another seed, another batch order and initial state: the two runs of a cell train differently.
    assert history["vanilla.fkl.seed0"] != history["vanilla.fkl.seed1"]

    mlflow.set_tracking_uri(f"sqlite:///{project_copy / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["warmup-distill"], output_format="list")
    distill_runs = {r.info.run_name: r for r in found if r.data.tags.get("stage") == "distill"}
    assert set(distill_runs) == {
        f"{v}.{o}.seed{s}.distill · test"
        for v in ("vanilla", "warmup")
        for o in ("fkl", "sft")
        for s in (0, 1)
    }
    assert {r.data.tags["seed"] for r in distill_runs.values()} == {"0", "1"}
    parent = next(r for r in found if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("seed"))
    assert parent.data.tags["seed"] == "0 1"

    reporting = project_copy / f"{TEST_DATA}/08_reporting"
    evaluation = json.loads(
        _latest(reporting / "evaluation/warmup.fkl.seed1.evaluation_metrics.json").read_text()
    )
    assert evaluation["training_seed"] == 1 and evaluation["subject"] == "warmup.fkl.seed1"
    assert len(evaluation["items"]["math"]["scores"]) == evaluation["math"]["n_examples"]
    keys = ["objective", "variant", "benchmark", "metric"]
    table = pd.read_csv(_latest(reporting / "report.csv")).set_index(keys)
    assert table.loc[("fkl", "vanilla", "math", "exact_match"), "n_seeds"] == 2
    for row in (
        ("fkl", "warmup-vanilla", "math", "exact_match"),
        ("fkl-sft", "warmup", "math", "exact_match"),
        ("fkl-sft", "vanilla", "average", "score"),
    ):
        low, mean, high = table.loc[row, ["ci_low", "mean", "ci_high"]]
        assert low <= mean <= high, row
    report = _latest(reporting / "report.md").read_text()
    assert "paired bootstrap" in report and "KD cells: mean ± std over 2 training seeds (0, 1)" in report

    from warmup_distill_kedro.compare import compare_table

    compared, markdown = compare_table(f"sqlite:///{project_copy / 'mlflow.db'}", env="test")
    # Two training seeds, whatever seeds the teacher's and the students' before-KD runs carry.
    assert "2 training seed(s)" in markdown and "over 2 training seeds (0, 1)" in markdown
    assert (compared["status"] == "ok").all()  # the control, measured before KD only, is no missing column
    cells = compared.set_index(keys)
    assert cells.loc[("fkl", "warmup", "math", "exact_match"), "n_seeds"] == 2
    for row in (
        ("fkl", "warmup-vanilla", "math", "exact_match"),
        ("fkl-sft", "vanilla", "instruction", "rouge_l"),
    ):  # the same intervals
        assert cells.loc[row, ["ci_low", "ci_high"]].tolist() == pytest.approx(
            table.loc[row, ["ci_low", "ci_high"]].tolist()
        ), row
