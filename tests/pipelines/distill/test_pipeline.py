"""The `distill` pipeline on an in-memory catalog, built for a one-cell grid: the shared KD set, then the
cell's node in its namespace, reading its variant's starting student and writing `<variant>.<objective>.*`."""

from __future__ import annotations

import pytest

from tests.helpers import run_pipeline
from warmup_distill_kedro.pipelines.distill.pipeline import create_pipeline


def test_one_token_level_cell(use_grid, distill_params, teacher, student, splits):
    use_grid(["vanilla"], ["fkl"])
    pipeline = create_pipeline()
    assert {n.name for n in pipeline.nodes} == {"prepare_kd_examples", "vanilla.fkl.distill_vanilla_fkl"}
    train, validation, _ = splits
    params = distill_params(["vanilla"], ["fkl"])
    outputs = run_pipeline(
        pipeline,
        {
            "teacher_model": teacher,
            "student_model": student,
            "train_examples": train,
            "validation_examples": validation,
            "params:distill": params,
        },
    )
    assert outputs["kd_examples"]["example_id"].tolist() == train["example_id"].iloc[2:10].tolist()
    distilled, metrics = outputs["vanilla.fkl.student"], outputs["vanilla.fkl.distill_metrics"]
    assert distilled.metadata["stage"] == "distill" and distilled.metadata["steps"] == 2
    assert (distilled.metadata["variant"], distilled.metadata["objective"]) == ("vanilla", "fkl")
    assert distilled.metadata["loss"]["objective"] == "fkl"
    assert distilled.metadata["loss"]["temperature"] == params.temperature
    assert distilled.model is not student.model and distilled.tokenizer is student.tokenizer
    assert (metrics["variant"], metrics["objective"], metrics["data_mode"]) == (
        "vanilla",
        "fkl",
        "off_policy",
    )
    assert metrics["train_sequences"] == 8 and metrics["steps"] == 2
    training = [record for record in metrics["history"] if "loss" in record]
    assert [record["step"] for record in training] == [1, 2]
    assert all({"ce", "kd", "tokens"} <= set(record) for record in training)
    assert metrics["initial_validation_kl"] > 0 and metrics["final_validation_kl"] > 0
    assert metrics["initial_validation_nll"] != pytest.approx(metrics["final_validation_nll"])  # it trained


def test_the_sft_baseline_cell_of_the_control_student(use_grid, distill_params, teacher, student, splits):
    """The baseline reads the student's gold examples (not the KD set), starting from student_control."""
    use_grid(["control"], ["sft"])
    pipeline = create_pipeline()
    assert {n.name for n in pipeline.nodes} == {
        "prepare_kd_examples",
        "prepare_sft_examples",
        "control.sft.distill_control_sft",
    }
    assert pipeline.inputs() == {
        "teacher_model",
        "student_control",
        "train_examples",
        "validation_examples",
        "params:distill",
    }
    train, validation, _ = splits
    outputs = run_pipeline(
        pipeline,
        {
            "teacher_model": teacher,
            "student_control": student,
            "train_examples": train,
            "validation_examples": validation,
            "params:distill": distill_params(["control"], ["sft"]),
        },
    )
    assert outputs["sft_examples"]["example_id"].tolist() == train["example_id"].head(6).tolist()
    distilled, metrics = outputs["control.sft.student"], outputs["control.sft.distill_metrics"]
    assert distilled.metadata["loss"] is None  # no teacher in the loss
    assert (distilled.metadata["variant"], distilled.metadata["objective"]) == ("control", "sft")
    assert metrics["train_sequences"] == 6
    assert "final_validation_kl" in metrics  # measured against the teacher all the same (the KD curves)


def test_token_level_cells_read_the_teachers_cache_the_others_the_live_teacher(
    use_grid, distill_params, teacher, student, splits
):
    """distill.teacher_cache: one node runs the teacher over the KD set; fkl reads its top-k, dskd and sft
    do not. At k = the vocabulary the cached cell trains as the live one (float32 values)."""
    cache = {"enabled": True, "top_k": len(teacher.tokenizer), "values": "float32", "show_progress": False}
    use_grid(["vanilla"], ["fkl", "dskd", "sft"], teacher_cache=cache)
    pipeline = create_pipeline()
    readers = {n.name for n in pipeline.nodes if "teacher_topk" in n.inputs}
    assert readers == {"vanilla.fkl.distill_vanilla_fkl"}
    assert "cache_teacher_logits" in {n.name for n in pipeline.nodes}
    train, validation, _ = splits
    data = {
        "teacher_model": teacher,
        "student_model": student,
        "train_examples": train,
        "validation_examples": validation,
    }
    cached = run_pipeline(
        pipeline,
        {**data, "params:distill": distill_params(["vanilla"], ["fkl", "dskd", "sft"], teacher_cache=cache)},
    )
    topk = cached["teacher_topk"]
    assert topk.k == len(teacher.tokenizer) and topk.metadata["n_examples"] == 8

    use_grid(["vanilla"], ["fkl"])
    live = run_pipeline(create_pipeline(), {**data, "params:distill": distill_params(["vanilla"], ["fkl"])})
    cached_metrics, live_metrics = cached["vanilla.fkl.distill_metrics"], live["vanilla.fkl.distill_metrics"]
    for key in ("final_validation_nll", "final_validation_kl"):
        assert cached_metrics[key] == pytest.approx(live_metrics[key], rel=1e-5), key
    first = [[r for r in m["history"] if "loss" in r][0] for m in (cached_metrics, live_metrics)]
    assert first[0]["kd"] == pytest.approx(first[1]["kd"], rel=1e-5)


def test_a_cache_is_not_built_for_the_sampled_data_modes(use_grid):
    use_grid(["vanilla"], ["fkl"], teacher_cache={"enabled": True}, data={"mode": "on_policy"})
    pipeline = create_pipeline()
    assert "cache_teacher_logits" not in {n.name for n in pipeline.nodes}
    assert not any("teacher_topk" in n.inputs for n in pipeline.nodes)


def test_the_methods_the_dskd_paper_compares_are_cells_of_the_grid(
    use_grid, distill_params, teacher, student, splits
):
    """dpkd (token-level DPO against the teacher), sinkd (fkl plus the batch's Sinkhorn distance) and minillm
    (policy gradient on the student's rollouts) train like any cell, each with its loss settings in the
    student's metadata and its terms in the history."""
    objectives = ["dpkd", "sinkd", "minillm"]
    use_grid(["vanilla"], objectives)
    train, validation, _ = splits
    outputs = run_pipeline(
        create_pipeline(),
        {
            "teacher_model": teacher,
            "student_model": student,
            "train_examples": train,
            "validation_examples": validation,
            "params:distill": distill_params(["vanilla"], objectives, options={"sinkd": {"weight": 0.5}}),
        },
    )
    dpkd, sinkd, minillm = (outputs[f"vanilla.{o}.student"].metadata["loss"] for o in objectives)
    assert (dpkd["objective"], dpkd["options"]) == ("dpkd", {"beta": 0.1, "label_smoothing": 0.0})
    assert (sinkd["base"], sinkd["weight"], sinkd["iters"]) == ("fkl", 0.5, 20)
    assert (minillm["alpha"], minillm["ppo_epochs"], minillm["lm_coef"]) == (0.2, 4, 1.0)
    for objective in objectives:
        metrics = outputs[f"vanilla.{objective}.distill_metrics"]
        training = [record for record in metrics["history"] if "loss" in record]
        assert len(training) == 2 and all(record["kd"] > 0 for record in training)
        assert metrics["initial_validation_nll"] != pytest.approx(metrics["final_validation_nll"])
    sinkd_history = outputs["vanilla.sinkd.distill_metrics"]["history"]
    assert all(record["sinkhorn"] > 0 for record in sinkd_history if "loss" in record)
    minillm_history = [r for r in outputs["vanilla.minillm.distill_metrics"]["history"] if "loss" in r]
    assert all({"pg", "single_step", "ratio", "reward", "lm"} <= set(record) for record in minillm_history)
