"""Figures of the report: accuracy per objective, the teacher-probability histograms before and after
warmup, the KD loss curves of one objective per student variant, and what KD (per objective) and warmup
moved on held-out gold tokens (the explain pipeline's changes).

Figures are built as ``matplotlib.figure.Figure`` objects on the Agg canvas, never through pyplot, so
building one neither opens a window nor touches the caller's current figure; the caller saves or
displays it (Kedro's MatplotlibWriter, a notebook) and owns it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from warmup_distill_kedro.core.evaluation.explain import ALL as EXPLAIN_ALL
from warmup_distill_kedro.core.evaluation.explain import POSITION_BUCKETS, TOKEN_CLASSES
from warmup_distill_kedro.reporting.table import (
    BEFORE_KD,
    DELTA_VARIANTS,
    OBJECTIVE_LABELS,
    OK,
    TABLE1_BENCHMARKS,
    TABLE_COLUMNS,
    TEACHER,
    is_difference,
)

# The training KD term of a cell's history, by preference: DSKD cells log the student-space term.
TRAINING_KD_KEYS = ("kd", "kd_student", "loss")
EVAL_KEYS = ("eval/validation_kl", "eval/validation_nll")
EARLY_STAGE_TITLE = "the mismatch in the early stage of distillation"
# The accuracy figure: one panel per benchmark, stacked, at most a page wide (inches).
ACCURACY_MAX_WIDTH = 10.0
ACCURACY_PANEL_HEIGHT = 2.6


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[Figure, list[Any]]:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    return figure, list(axes.flat)


# ----------------------------------------------------------------------------------------- accuracy
def accuracy_by_objective(table: pd.DataFrame) -> Figure:
    """Grouped bars (one group per objective, one bar per student variant), one panel per accuracy
    benchmark in the table (math, instruction, average) stacked in a column that reads at a page's width;
    error bars = std over seeds. Each panel's y-axis spans the students' values, so the differences
    between variants show; the teacher, far above them, is a note in the panel's corner. Missing cells get
    no bar and a "missing" mark at the bottom, so an absent result is visible."""
    absent = [column for column in TABLE_COLUMNS if column not in getattr(table, "columns", [])]
    if absent:
        raise ValueError(f"table: missing column(s) {absent}; expected the output of build_table")
    benchmarks = [
        (b, m)
        for b, m in TABLE1_BENCHMARKS.items()
        if ((table["benchmark"] == b) & (table["metric"] == m)).any()
    ]
    if not benchmarks:
        raise ValueError("table: no math, instruction or average rows to plot (field 'benchmark')")
    variants = [v for v in table["variant"].unique() if v != TEACHER and v not in DELTA_VARIANTS]
    # Accuracies only: the differences (`fkl-sft` rows) are the table's, not bars beside the accuracies.
    objectives = [o for o in table["objective"].unique() if o != TEACHER and not is_difference(o, "")]
    width = min(ACCURACY_MAX_WIDTH, max(6.0, 0.7 * len(objectives) * max(len(variants), 1) + 2.0))
    figure, axes = _figure(width, ACCURACY_PANEL_HEIGHT * len(benchmarks), nrows=len(benchmarks))
    bar = 0.8 / max(len(variants), 1)
    x = np.arange(len(objectives))
    for ax, (benchmark, metric) in zip(axes, benchmarks, strict=True):
        rows = table[(table["benchmark"] == benchmark) & (table["metric"] == metric)]
        lows, highs, missing = [], [], []
        for i, variant in enumerate(variants):
            cell = rows[rows["variant"] == variant].set_index("objective").reindex(objectives)
            ok = (cell["status"] == OK).to_numpy()
            means = np.where(ok, cell["mean"] * 100.0, np.nan)
            stds = np.where(ok & (cell["n_seeds"] >= 2), cell["std"] * 100.0, 0.0)
            offset = x - 0.4 + bar * (i + 0.5)
            ax.bar(offset, means, bar, yerr=stds, capsize=3, label=variant)
            lows += list((means - stds)[ok])
            highs += list((means + stds)[ok])
            missing += list(offset[~ok & cell["status"].notna().to_numpy()])
        low, high = _student_range(lows, highs)
        ax.set_ylim(low, high)
        for position in missing:
            ax.text(position, low, "missing", rotation=90, ha="center", va="bottom", fontsize=7)
        teacher = rows[(rows["objective"] == TEACHER) & (rows["status"] == OK)]
        if not teacher.empty:
            ax.text(
                0.01, 0.97, f"teacher: {teacher['mean'].iloc[0] * 100.0:.1f}", transform=ax.transAxes,
                ha="left", va="top", fontsize=8, bbox={"facecolor": "white", "edgecolor": "0.7"},
            )  # fmt: skip
        ax.set_xticks(x, [OBJECTIVE_LABELS.get(o, o) for o in objectives])
        ax.set_title(f"{benchmark} ({metric})", fontsize=10)
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right", ncols=len(variants))
    return figure


def _student_range(lows: list[float], highs: list[float]) -> tuple[float, float]:
    """The y-range of the students' bars and error bars, with room above for the legend and the note."""
    if not lows:
        return 0.0, 100.0
    low, high = min(lows), max(highs)
    span = max(high - low, 2.0)  # at least 2 points, so that equal values do not fill the panel
    return max(0.0, low - 0.3 * span), high + 0.45 * span


# ------------------------------------------------------------------------------ teacher probabilities
def teacher_probability_histograms(
    evaluations: Mapping[str, Mapping[str, Any]], tau: float | None = None
) -> Figure:
    """The histograms of the teacher's probability of each model's sampled tokens, as shares of tokens on
    a log axis, overlaid. ``evaluations`` maps a legend label (e.g. "before warmup") to the evaluation
    JSON of a model; with ``tau``, a vertical line and each model's share below it."""
    figure, (ax,) = _figure(6.5, 4.0)
    for label, evaluation in evaluations.items():
        edges, shares = _histogram(evaluation, label)
        if tau is not None:
            label += f" ({_share_below(edges, shares, tau):.1%} of tokens below tau)"
        # A trailing repeat of the last share draws the last bin's top edge with where="post".
        ax.step(edges, np.append(shares, shares[-1]), where="post", label=label)
    if tau is not None:
        ax.axvline(tau, color="black", linestyle="--", linewidth=1, label=f"tau = {tau:g}")
    ax.set_yscale("log")
    ax.set_xlabel("teacher probability of the sampled token")
    ax.set_ylabel("share of sampled tokens")
    ax.set_title("Teacher probability of the student's tokens")
    ax.legend(fontsize=8)
    return figure


def _histogram(evaluation: Mapping[str, Any], subject: str) -> tuple[np.ndarray, np.ndarray]:
    field = "distribution.teacher_prob_histogram"
    distribution = evaluation.get("distribution") if isinstance(evaluation, Mapping) else None
    distribution = distribution or {}
    histogram = distribution.get("teacher_prob_histogram") if isinstance(distribution, Mapping) else None
    if not isinstance(histogram, Mapping):
        raise ValueError(f"subject {subject!r}: field '{field}' is missing (no histogram to plot)")
    try:
        edges = np.asarray(histogram["edges"], dtype=float)
        counts = np.asarray(histogram["counts"], dtype=float)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"subject {subject!r}: field '{field}' needs numeric 'edges' and 'counts' ({exc})"
        ) from None
    if edges.ndim != 1 or counts.ndim != 1 or len(edges) != len(counts) + 1 or len(counts) == 0:
        raise ValueError(
            f"subject {subject!r}: field '{field}' needs len(edges) == len(counts) + 1, "
            f"got {edges.shape} edges and {counts.shape} counts"
        )
    if (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(
            f"subject {subject!r}: field '{field}.counts' must be non-negative with a positive sum"
        )
    return edges, counts / counts.sum()


def _share_below(edges: np.ndarray, shares: np.ndarray, tau: float) -> float:
    """Share of tokens with teacher probability below tau; a bin cut by tau counts in proportion."""
    lower, upper = edges[:-1], edges[1:]
    covered = np.clip((tau - lower) / (upper - lower), 0.0, 1.0)
    return float(np.sum(shares * covered))


# ------------------------------------------------------------------------------------ KD loss curves
def kd_loss_curves(distill_metrics: Mapping[str, Mapping[str, Any]], objective: str) -> Figure:
    """Left: the training KD term per step for each variant; right: the held-out KL (else NLL) at each
    evaluation step. ``distill_metrics`` maps a variant to the distill metrics JSON of its ``objective``
    cell, which holds the training ``history``."""
    if not distill_metrics:
        raise ValueError(f"distill_metrics for {objective!r}: no variants to plot")
    figure, (train_ax, eval_ax) = _figure(11.0, 4.0, 2)
    train_keys, eval_keys = set(), set()
    for variant, metrics in distill_metrics.items():
        history = metrics.get("history") if isinstance(metrics, Mapping) else None
        if not isinstance(history, Sequence) or not history:
            raise ValueError(f"variant {variant!r} ({objective}): field 'history' is missing or empty")
        records = [record for record in history if isinstance(record, Mapping) and "step" in record]
        train_key = _first_key(records, TRAINING_KD_KEYS)
        if train_key is None:
            raise ValueError(
                f"variant {variant!r} ({objective}): field 'history' has no training term "
                f"(one of {list(TRAINING_KD_KEYS)} with a 'step')"
            )
        train_keys.add(train_key)
        steps, values = _series(records, train_key)
        train_ax.plot(steps, values, label=variant)
        eval_key = _first_key(records, EVAL_KEYS)
        if eval_key is not None:
            eval_keys.add(eval_key)
            steps, values = _series(records, eval_key)
            eval_ax.plot(steps, values, marker="o", label=variant)
    train_ax.set_title(f"training KD term ({', '.join(sorted(train_keys))})")
    train_ax.set_xlabel("step")
    train_ax.set_ylabel("training loss term")
    train_ax.legend(fontsize=8)
    eval_ax.set_title(f"held-out ({', '.join(sorted(eval_keys)) or 'no evaluation logged'})")
    eval_ax.set_xlabel("step")
    eval_ax.set_ylabel("held-out divergence")
    if eval_keys:
        eval_ax.legend(fontsize=8)
    figure.suptitle(f"{objective}: {EARLY_STAGE_TITLE}")
    return figure


def _first_key(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str | None:
    for key in keys:
        if any(record.get(key) is not None for record in records):
            return key
    return None


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(float(r["step"]), float(r[key])) for r in records if r.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


# ------------------------------------------------------------------------------------------- the check
def sampled_token_probabilities(
    teacher_logprobs: Sequence[Sequence[float]], tau: float | None = None, bins: int = 50
) -> Figure:
    """Histogram of the teacher's probability of every token the student sampled (one sequence of
    log-probabilities per rollout): the mismatch itself, with the check rule's tau when it is a probability."""
    probabilities = np.exp(np.concatenate([np.asarray(lp, dtype=np.float64) for lp in teacher_logprobs]))
    figure, (axis,) = _figure(7, 4)
    axis.hist(probabilities, bins=np.linspace(0.0, 1.0, bins + 1), color="tab:blue")
    axis.set_yscale("log")
    axis.set_xlabel("teacher probability of the student's sampled token")
    axis.set_ylabel("tokens (log scale)")
    if tau is not None:
        below = 100 * float(np.mean(probabilities < tau))
        axis.axvline(tau, color="tab:red", linestyle="--", label=f"tau = {tau:g} ({below:.1f}% below)")
        axis.legend()
    axis.set_title(f"{len(probabilities)} tokens of {len(teacher_logprobs)} student rollouts")
    return figure


# ------------------------------------------------------------------------------------------- explain
def explain_objective(changes: pd.DataFrame, objective: str) -> Figure:
    """Where KD with ``objective`` moved each variant's student on held-out gold tokens (the
    ``explain_changes`` table, after - before KD): KL(teacher || student), NLL and top-1 accuracy by token
    class, KL and NLL by response position, and the KL change split into the teacher's top token and the
    rest."""
    rows = _explain_rows(changes, changes["objective"] == objective, f"objective {objective!r}")
    figure = _explain_figure(rows, "variant")
    _top_and_rest(figure.axes[5], rows)
    figure.suptitle(f"{objective}: where KD moved the student (after - before KD, held-out gold tokens)")
    return figure


def explain_warmup(changes: pd.DataFrame, rejected: pd.DataFrame) -> Figure:
    """Which tokens warmup moved before any KD (``warmup.before_kd`` - ``vanilla.before_kd``, and the
    fairness control beside it), against the classes of the tokens the check stage rejected in the
    corrected set (``explain_rejected``: share of the rejections vs share of all tokens)."""
    before_kd = (changes["baseline"] == f"vanilla.{BEFORE_KD}") & (changes["objective"] == BEFORE_KD)
    rows = _explain_rows(changes, before_kd, "the students before KD against the vanilla one")
    figure = _explain_figure(rows, "variant")
    axis = figure.axes[5]
    shares = rejected.set_index("token_class").reindex(list(TOKEN_CLASSES))
    x = np.arange(len(TOKEN_CLASSES))
    axis.bar(x - 0.2, shares["rejected_share"] * 100.0, 0.4, label="first rejected token of a pair")
    axis.bar(
        x + 0.2, shares["token_share"] * 100.0, 0.4, label="tokens of the rejected responses", color="0.7"
    )
    axis.set_xticks(x, list(TOKEN_CLASSES))
    axis.set_ylabel("%")
    axis.set_title(f"classes the check rejected ({int(shares['rejected'].sum())} corrected pairs)")
    axis.legend(fontsize=8)
    figure.suptitle("warmup: what it moved before KD (student - vanilla student, held-out gold tokens)")
    return figure


def _explain_rows(changes: pd.DataFrame, selected: pd.Series, what: str) -> pd.DataFrame:
    absent = [c for c in ("variant", "task", "by", "group", "delta_kl", "delta_nll") if c not in changes]
    if absent:
        raise ValueError(f"explain_changes: missing column(s) {absent}; expected explain.changes' output")
    rows = changes[selected & (changes["task"] == EXPLAIN_ALL)]
    if rows.empty:
        raise ValueError(f"explain_changes: no rows for {what}")
    return rows


# The explain figures' panels of one row: (delta column, what it is, unit, scale).
EXPLAIN_MEASURES = (
    ("delta_kl", "KL(teacher || student)", "nats per token", 1.0),
    ("delta_nll", "NLL of the gold token", "nats per token", 1.0),
    ("delta_student_top_is_gold", "top-1 accuracy", "points", 100.0),  # top token = gold
)


def _explain_figure(rows: pd.DataFrame, label: str) -> Figure:
    """Six panels (2 x 3), the last left to the caller: the change of KL, NLL and top-1 accuracy by
    token class (one bar per ``label``), then KL and NLL by response position (one line per ``label``)."""
    figure = Figure(figsize=(15.0, 8.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 3)
    labels = list(dict.fromkeys(rows[label]))
    classes = rows[rows["by"] == "class"]
    present = [c for c in TOKEN_CLASSES if c in set(classes["group"])]
    positions = rows[(rows["by"] == "position") & (rows["group"] != EXPLAIN_ALL)]
    buckets = [b for b in POSITION_BUCKETS if b in set(positions["group"])]
    width = 0.8 / len(labels)
    x = np.arange(len(present))
    for i, name in enumerate(labels):
        by_class = classes[classes[label] == name].set_index("group").reindex(present)
        by_position = positions[positions[label] == name].set_index("group").reindex(buckets)
        for axis, (column, _, _, scale) in zip(axes[0], EXPLAIN_MEASURES, strict=True):
            axis.bar(x - 0.4 + width * (i + 0.5), by_class[column] * scale, width, label=name, color=f"C{i}")
        for axis, (column, _, _, scale) in zip(axes[1][:2], EXPLAIN_MEASURES[:2], strict=True):
            axis.plot(buckets, by_position[column] * scale, marker="o", label=name, color=f"C{i}")
        if by_class["delta_kl"].isna().all():
            axes[0][0].text(0.02, 0.95 - 0.08 * i, f"{name}: no KL (another tokenizer)", fontsize=8,
                            transform=axes[0][0].transAxes, va="top")  # fmt: skip
    for axis, (_, what, unit, _) in zip(axes[0], EXPLAIN_MEASURES, strict=True):
        if all(patch.get_height() == 0.0 for patch in axis.patches):  # zero-height bars draw nothing
            axis.text(0.5, 0.6, "no change in any class", ha="center", transform=axis.transAxes)
        axis.set_xticks(x, present)
        axis.set_title(f"{what}: change by token class")
        axis.set_ylabel(f"change ({unit})")
    for axis, (_, what, unit, _) in zip(axes[1][:2], EXPLAIN_MEASURES[:2], strict=True):
        axis.set_title(f"{what}: change by response position")
        axis.set_xlabel("position in the response (tokens)")
        axis.set_ylabel(f"change ({unit})")
    for axis in [*axes[0], *axes[1][:2]]:
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.legend(fontsize=8)
    return figure


def _top_and_rest(axis: Any, rows: pd.DataFrame) -> None:
    """Per variant: the KL change on the teacher's top token, on the rest, and their sum."""
    overall = rows[(rows["by"] == "class") & (rows["group"] == EXPLAIN_ALL)].set_index("variant")
    x = np.arange(len(overall))
    axis.bar(x - 0.2, overall["delta_kl_top"], 0.4, label="top token: KL(b_p || b_q)")
    axis.bar(x + 0.2, overall["delta_kl_rest"], 0.4, label="rest: (1 - p_k) KL(p~ || q~)")
    axis.scatter(x, overall["delta_kl"], color="black", zorder=3, label="KL (their sum)")
    axis.set_xticks(x, list(overall.index))
    axis.set_title("KL change: the teacher's top token vs the rest")
    axis.set_ylabel("change (nats per token)")
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.margins(y=0.3)  # room for the legend
    axis.legend(fontsize=8, loc="best")
