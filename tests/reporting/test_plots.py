from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from tests.helpers import evaluation, explain_changes_table
from warmup_distill_kedro.reporting.plots import (
    accuracy_by_objective,
    explain_objective,
    explain_warmup,
    kd_loss_curves,
    teacher_probability_histograms,
)
from warmup_distill_kedro.reporting.records import evaluation_records
from warmup_distill_kedro.reporting.table import build_table


@pytest.fixture
def table():
    evaluations = {
        "teacher": evaluation("teacher", "teacher", "teacher", 0.90, (0.60, 0.62), kl=None),
        "student": evaluation("student", "vanilla", "before_kd", 0.30, (0.40, 0.42)),
        "warmup_student": evaluation("warmup_student", "warmup", "before_kd", 0.28, (0.38, 0.40)),
        "vanilla.fkl": evaluation("vanilla.fkl", "vanilla", "fkl", 0.40, (0.50, 0.52)),
        "warmup.fkl": evaluation("warmup.fkl", "warmup", "fkl", 0.44, (0.50, 0.54)),
    }
    return build_table(evaluation_records(evaluations), ["vanilla", "warmup"], ["fkl", "rkl"])


def test_accuracy_by_objective_bars_per_variant_and_the_teacher_as_a_note(table):
    figure = accuracy_by_objective(table)
    assert isinstance(figure, Figure)
    axes = figure.get_axes()
    assert [ax.get_title() for ax in axes] == [
        "math (exact_match)",
        "instruction (rouge_l)",
        "average (score)",
    ]
    math_ax = axes[0]
    assert [label.get_text() for label in math_ax.get_xticklabels()] == ["before KD", "fkl", "rkl"]
    # 2 variants x 3 objectives; rkl has no records, so its bars have no height and are marked "missing"
    heights = [patch.get_height() for patch in math_ax.patches]
    assert len(heights) == 6
    np.testing.assert_allclose(heights[:2], [30.0, 40.0])  # vanilla: before KD, fkl (percent)
    assert np.isnan(heights[2]) and np.isnan(heights[5])
    assert sum(text.get_text() == "missing" for text in math_ax.texts) == 2
    # The teacher is a note, not a line the axis would have to reach: the axis spans the students.
    assert "teacher: 90.0" in [text.get_text() for text in math_ax.texts]
    assert not math_ax.get_lines() or all(line.get_label() != "teacher" for line in math_ax.get_lines())
    low, high = math_ax.get_ylim()
    assert 20.0 < low < 30.0 and 44.0 < high < 60.0  # students at 28-44% in math, the teacher at 90%
    legend = [text.get_text() for text in math_ax.get_legend().get_texts()]
    assert legend == ["vanilla", "warmup"]


def test_accuracy_panels_are_stacked_to_read_at_a_page_width(table):
    figure = accuracy_by_objective(table)
    width, height = figure.get_size_inches()
    assert width <= 10.0 and height < 3 * width  # one column of three panels, not one row of three
    panels = figure.get_axes()
    assert len({round(ax.get_position().x0, 3) for ax in panels}) == 1


def test_accuracy_error_bars_are_the_std_in_percent(table):
    instruction_ax = accuracy_by_objective(table).get_axes()[1]
    # warmup/fkl: ROUGE-L 0.50, 0.54 -> std 0.02828 -> error bar from 49.17 to 54.83
    segments = [seg for collection in instruction_ax.collections for seg in collection.get_segments()]
    spans = sorted(round(float(seg[1][1] - seg[0][1]), 3) for seg in segments if len(seg) == 2)
    # before KD and fkl for each variant: ROUGE-L pairs 0.02 apart (vanilla) and 0.02 / 0.04 (warmup)
    expected = [
        2 * 100 * np.std(pair, ddof=1) for pair in ([0.40, 0.42], [0.50, 0.52], [0.38, 0.40], [0.50, 0.54])
    ]
    assert spans == sorted(round(float(value), 3) for value in expected)


def test_teacher_probability_histograms_overlay_shares_with_tau():
    counts_before = [50] + [0] * 18 + [50]
    counts_after = [10] + [0] * 18 + [90]
    evaluations = {
        "before warmup": evaluation("vanilla.before_kd", "vanilla", "before_kd", counts=counts_before),
        "after warmup": evaluation("warmup.before_kd", "warmup", "before_kd", counts=counts_after),
    }
    figure = teacher_probability_histograms(evaluations, tau=0.05)
    (ax,) = figure.get_axes()
    assert ax.get_yscale() == "log"
    lines = ax.get_lines()
    assert len(lines) == 3  # two step lines and the tau line
    assert lines[0].get_label() == "before warmup (50.0% of tokens below tau)"
    assert lines[1].get_label() == "after warmup (10.0% of tokens below tau)"
    assert lines[2].get_label() == "tau = 0.05" and lines[2].get_xdata()[0] == 0.05
    # normalised to shares of tokens: the bins (all but the repeated last point) sum to 1
    assert np.sum(lines[1].get_ydata()[:-1]) == pytest.approx(1.0)


def test_teacher_probability_histograms_without_tau_have_plain_labels():
    evaluations = {
        "before warmup": evaluation("vanilla.before_kd", "vanilla", "before_kd", counts=[1] * 20),
        "after warmup": evaluation("warmup.before_kd", "warmup", "before_kd", counts=[2] * 20),
    }
    ax = teacher_probability_histograms(evaluations).get_axes()[0]
    assert [line.get_label() for line in ax.get_lines()] == ["before warmup", "after warmup"]


def test_a_model_without_histogram_is_named():
    evaluations = {
        "before warmup": evaluation("vanilla.before_kd", "vanilla", "before_kd", counts=[1] * 20),
        "after warmup": evaluation("warmup.before_kd", "warmup", "before_kd", counts=None),
    }
    with pytest.raises(
        ValueError, match=r"subject 'after warmup': field 'distribution.teacher_prob_histogram'"
    ):
        teacher_probability_histograms(evaluations)


def history(kd_key: str, kd_values: list[float], eval_kl: list[float]) -> dict:
    training = [{"step": 10.0 * (i + 1), "loss": 2.0, "ce": 1.0, kd_key: v} for i, v in enumerate(kd_values)]
    evaluation_steps = [
        {"step": 100.0 * (i + 1), "eval/validation_nll": 0.3, "eval/validation_kl": v}
        for i, v in enumerate(eval_kl)
    ]
    return {"history": training + evaluation_steps}


def test_kd_loss_curves_plot_each_variant_in_both_panels():
    metrics = {
        "vanilla": history("kd", [0.9, 0.5, 0.3], [0.20, 0.15]),
        "warmup": history("kd_student", [0.6, 0.4, 0.3], [0.18, 0.14]),
    }
    figure = kd_loss_curves(metrics, "fkl")
    train_ax, eval_ax = figure.get_axes()
    assert "the mismatch in the early stage of distillation" in figure.get_suptitle()
    assert figure.get_suptitle().startswith("fkl")
    assert [line.get_label() for line in train_ax.get_lines()] == ["vanilla", "warmup"]
    np.testing.assert_allclose(train_ax.get_lines()[1].get_ydata(), [0.6, 0.4, 0.3])  # kd_student for DSKD
    np.testing.assert_allclose(eval_ax.get_lines()[0].get_xdata(), [100.0, 200.0])
    np.testing.assert_allclose(eval_ax.get_lines()[0].get_ydata(), [0.20, 0.15])  # KL preferred over NLL
    assert train_ax.get_title() == "training KD term (kd, kd_student)"


def test_kd_loss_curves_fall_back_to_loss_and_validation_nll():
    metrics = {
        "vanilla": {"history": [{"step": 1.0, "loss": 3.0}, {"step": 5.0, "eval/validation_nll": 0.7}]}
    }
    train_ax, eval_ax = kd_loss_curves(metrics, "sft").get_axes()
    np.testing.assert_allclose(train_ax.get_lines()[0].get_ydata(), [3.0])
    np.testing.assert_allclose(eval_ax.get_lines()[0].get_ydata(), [0.7])
    assert eval_ax.get_title() == "held-out (eval/validation_nll)"


def test_a_variant_without_history_is_named():
    metrics = {"vanilla": history("kd", [0.5], [0.2]), "warmup": {"final": {"heldout_kl": 0.1}}}
    with pytest.raises(ValueError, match=r"variant 'warmup' \(fkl\): field 'history' is missing"):
        kd_loss_curves(metrics, "fkl")


# ------------------------------------------------------------------------------------------- explain
KD_PAIRS = [("vanilla.before_kd", "vanilla.fkl"), ("warmup.before_kd", "warmup.fkl")]
WARMUP_PAIRS = [("vanilla.before_kd", "warmup.before_kd"), ("vanilla.before_kd", "control.before_kd")]
KL = {"vanilla.before_kd": 0.4, "vanilla.fkl": 0.1, "warmup.before_kd": 0.3, "warmup.fkl": 0.05,
      "control.before_kd": 0.35}  # fmt: skip


def _heights(axis) -> list[float]:
    return [round(patch.get_height(), 9) for patch in axis.patches]


def test_explain_objective_plots_the_changes_of_each_variant():
    figure = explain_objective(explain_changes_table(KL, KD_PAIRS + WARMUP_PAIRS), "fkl")
    kl_axis, nll_axis, top1_axis, kl_position, nll_position, split = figure.get_axes()
    # Every token of a subject has the same KL (NLL twice it): each class moved by the subject's change.
    classes = [tick.get_text() for tick in kl_axis.get_xticklabels()]
    assert classes == ["digit", "operator", "eos", "word"]  # present classes, in TOKEN_CLASSES order
    assert _heights(kl_axis) == [-0.3] * 4 + [-0.25] * 4  # vanilla's bars, then warmup's
    assert _heights(nll_axis) == [-0.6] * 4 + [-0.5] * 4
    assert _heights(top1_axis) == [0.0] * 8
    assert [text.get_text() for text in top1_axis.texts] == ["no change in any class"]
    assert not kl_axis.texts
    assert [line.get_label() for line in kl_position.get_lines()[:2]] == ["vanilla", "warmup"]
    assert list(kl_position.get_lines()[0].get_ydata()) == pytest.approx([-0.3] * 4)
    assert list(kl_position.get_lines()[0].get_xdata()) == ["0", "1", "2-3", "4-7"]
    assert list(nll_position.get_lines()[1].get_ydata()) == pytest.approx([-0.5] * 4)
    # A quarter of each KL on the teacher's top token, three quarters on the rest; their sum as points.
    assert _heights(split) == [-0.075, -0.0625, -0.225, -0.1875]
    assert split.collections[0].get_offsets()[:, 1].tolist() == pytest.approx([-0.3, -0.25])
    assert "fkl" in figure._suptitle.get_text()


def test_explain_objective_says_when_a_variant_has_no_kl():
    changes = explain_changes_table({"vanilla.before_kd": float("nan"), "vanilla.fkl": float("nan")},
                                    KD_PAIRS[:1])  # fmt: skip
    kl_axis, nll_axis = explain_objective(changes, "fkl").get_axes()[:2]
    assert "vanilla: no KL (another tokenizer)" in [text.get_text() for text in kl_axis.texts]
    assert _heights(nll_axis) == [0.0] * 4  # NLL was measured (1.0 before and after)


def test_explain_warmup_plots_what_warmup_moved_beside_the_rejected_classes():
    rejected = pd.DataFrame({"token_class": ["digit", "operator", "eos", "formatting", "word"],
                             "rejected": [3, 1, 0, 0, 0], "rejected_share": [0.75, 0.25, 0.0, 0.0, 0.0],
                             "token_share": [0.5, 0.1, 0.1, 0.2, 0.1]})  # fmt: skip
    figure = explain_warmup(explain_changes_table(KL, KD_PAIRS + WARMUP_PAIRS), rejected)
    kl_axis, *_, shares = figure.get_axes()
    assert [t.get_text() for t in kl_axis.get_legend().get_texts()] == ["warmup", "control"]
    assert _heights(kl_axis) == [-0.1] * 4 + [-0.05] * 4
    assert _heights(shares) == [75.0, 25.0, 0.0, 0.0, 0.0, 50.0, 10.0, 10.0, 20.0, 10.0]
    assert "4 corrected pairs" in shares.get_title()


def test_explain_plots_name_what_is_missing():
    changes = explain_changes_table(KL, KD_PAIRS)
    with pytest.raises(ValueError, match="no rows for objective 'rkl'"):
        explain_objective(changes, "rkl")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['delta_kl'\]"):
        explain_objective(changes.drop(columns="delta_kl"), "fkl")
    with pytest.raises(ValueError, match="no rows for the students before KD"):
        explain_warmup(changes, pd.DataFrame())
