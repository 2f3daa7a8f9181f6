"""The comparison table (reporting.table) as a reader sees it: Markdown for the report (every column), a
compact one table per benchmark for a terminal (the demo's last screen), one summary line per difference for
logs, and the report's explain section (what KD and warmup moved)."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping, Sequence

import pandas as pd

from warmup_distill_kedro.core.evaluation.explain import ALL, TOKEN_CLASSES
from warmup_distill_kedro.reporting.intervals import excludes_zero
from warmup_distill_kedro.reporting.records import (
    DETERMINISTIC_SEED,
    DISTRIBUTION,
    GREEDY_SEED,
    INSTRUCTION,
    MATH,
)
from warmup_distill_kedro.reporting.table import (
    AVERAGE,
    BEFORE_KD,
    BENCHMARK_LABELS,
    DELTA_VARIANTS,
    DISTRIBUTION_SHOWN,
    INCOMPLETE,
    KEY,
    MISSING,
    OBJECTIVE_LABELS,
    OK,
    PERCENT_METRICS,
    TABLE1_BENCHMARKS,
    TABLE_COLUMNS,
    TEACHER,
    is_difference,
    lookup,
)

RESOLVED_MARK = "*"
FLEXIBLE = "flexible_match"  # math's second score (core/tasks/answers.py), not the headline
INTERVALS_NOTE = (
    f"A difference with [low, high] is its 95% interval (paired bootstrap over the test items and the "
    f"training seeds); {RESOLVED_MARK}: the interval excludes 0; without {RESOLVED_MARK}: no measurable difference."
)


# ------------------------------------------------------------------------------------------- rendering
def render_markdown(
    table: pd.DataFrame, title: str = "Warmup-Distill: distillation results", seed_kind: str | None = None
) -> str:
    """The comparison as a Markdown document: accuracy per objective x variant (Table 1), distribution
    statistics (Table 2) and a footer on seeds, missing cells and single-seed rows.

    ``seed_kind`` names what the seeds are in the footer ("sampling", "training"); None: "sampling" when
    math was decoded greedily (the evaluation JSONs), else "training" (runs compared from MLflow).
    """
    _check_table(table)
    parts = [f"# {title}", ""]
    parts += _accuracy_section(table)
    parts += _distribution_section(table)
    parts += ["## Notes", "", *[f"- {line}" for line in _footer(table, seed_kind)]]
    return "\n".join(parts) + "\n"


def _check_table(table: pd.DataFrame) -> None:
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"table must be a pandas DataFrame, got {type(table).__name__}")
    absent = [column for column in TABLE_COLUMNS if column not in table.columns]
    if absent:
        raise ValueError(
            f"table: missing column(s) {absent}; expected {list(TABLE_COLUMNS)} (see build_table)"
        )


def _plain_variants(table: pd.DataFrame) -> list[str]:
    return [v for v in table["variant"].unique() if v != TEACHER and v not in DELTA_VARIANTS]


def _delta_variants(table: pd.DataFrame) -> list[str]:
    return [v for v in table["variant"].unique() if v in DELTA_VARIANTS]


def _cell_name(objective: str, variant: str) -> str:
    return TEACHER if objective == TEACHER else f"{variant}/{objective}"


def _format_value(row: pd.Series | None, metric: str, signed: bool = False) -> str:
    """``43.2 ± 1.1`` (percent for accuracies), ``43.2`` for one seed, ``missing``; empty if no row. A
    difference with an interval: ``+1.2 [+0.3, +2.1] *``, the mark when the interval excludes zero."""
    if row is None:
        return ""
    if row["status"] != OK:
        return str(row["status"])
    scale, digits = (100.0, 1) if metric in PERCENT_METRICS else (1.0, 3)
    sign = "+" if signed else ""
    text = f"{row['mean'] * scale:{sign}.{digits}f}"
    if not pd.isna(row["ci_low"]):
        low, high = row["ci_low"] * scale, row["ci_high"] * scale
        text += f" [{low:+.{digits}f}, {high:+.{digits}f}]" + (
            f" {RESOLVED_MARK}" if excludes_zero(low, high) else ""
        )
    elif row["n_seeds"] >= 2:
        text += f" ± {row['std'] * scale:.{digits}f}"
    return text


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table padded to column width, so it reads as a table in a terminal too."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    widths = [max(width, 3) for width in widths]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True))
            + " |"
        )

    return [
        line(header),
        "|" + "|".join("-" * (width + 2) for width in widths) + "|",
        *[line(r) for r in rows],
    ]


def _accuracy_section(table: pd.DataFrame) -> list[str]:
    columns = {BENCHMARK_LABELS[b]: (b, m) for b, m in TABLE1_BENCHMARKS.items() if _has(table, b, m)}
    if not columns:
        return ["No math or instruction accuracy was measured.", ""]
    caption = (
        "Table 1. Accuracy in percent (math exact match, instruction ROUGE-L, their average); "
        "differences in points; mean ± std where there are 2 or more seeds. " + INTERVALS_NOTE
    )
    parts = [caption, "", *_markdown_table(*_objective_rows(table, columns)), ""]
    if _has(table, MATH, FLEXIBLE):
        caption = (
            "Table 1b. Math, flexible score in percent: the response's last number (lm-evaluation-harness's "
            "flexible extract), beside Table 1's strict `#### N` match, the headline."
        )
        header, rows = _objective_rows(table, {"math flexible": (MATH, FLEXIBLE)})
        rows = [row for row in rows if any(row[1:])]  # objectives with a flexible score (not `fkl-sft`)
        parts += [caption, "", *_markdown_table(header, rows), ""]
    return parts


def _objective_rows(
    table: pd.DataFrame, columns: Mapping[str, tuple[str, str]]
) -> tuple[list[str], list[list[str]]]:
    """A row per objective, a column per (label: (benchmark, metric)) and variant, then per difference."""
    plain, deltas = _plain_variants(table), _delta_variants(table)
    indexed = table.set_index(KEY)
    header = ["objective"]
    for label in columns:
        header += [f"{label}: {variant}" for variant in [*plain, *deltas]]
    rows = []
    for objective in table["objective"].unique():
        cells = [OBJECTIVE_LABELS.get(objective, objective)]
        for benchmark, metric in columns.values():
            if objective == TEACHER:
                # The teacher is one model, not a variant: its value sits in the first column only.
                teacher = lookup(indexed, TEACHER, TEACHER, benchmark, metric)
                cells += [_format_value(teacher, metric)] + [""] * (len(plain) + len(deltas) - 1)
                continue
            cells += [
                _format_value(
                    lookup(indexed, objective, v, benchmark, metric), metric, is_difference(objective, v)
                )
                for v in plain
            ]
            cells += [
                _format_value(lookup(indexed, objective, d, benchmark, metric), metric, signed=True)
                for d in deltas
            ]
        rows.append(cells)
    return header, rows


def _has(table: pd.DataFrame, benchmark: str, metric: str) -> bool:
    return bool(((table["benchmark"] == benchmark) & (table["metric"] == metric)).any())


def _distribution_section(table: pd.DataFrame) -> list[str]:
    metrics = [m for m in DISTRIBUTION_SHOWN if _has(table, DISTRIBUTION, m)]
    if not metrics:
        return ["No distribution statistics were measured.", ""]
    indexed = table.set_index(KEY)
    header = ["objective", "variant", *[f"{m} (%)" if m in PERCENT_METRICS else m for m in metrics]]
    rows = []
    plain = table[~table["variant"].isin(DELTA_VARIANTS) & (table["benchmark"] == DISTRIBUTION)]
    for objective, variant in dict.fromkeys(zip(plain["objective"], plain["variant"], strict=True)):
        cells = [OBJECTIVE_LABELS.get(objective, objective), variant]
        cells += [_format_value(lookup(indexed, objective, variant, DISTRIBUTION, m), m) for m in metrics]
        rows.append(cells)
    caption = (
        "Table 2. Distribution statistics on held-out responses: KL(teacher || student), share of sampled "
        "tokens the teacher rejects (%), student entropy, NLL; empty = not measured."
    )
    return [caption, "", *_markdown_table(header, rows), ""]


def _footer(table: pd.DataFrame, seed_kind: str | None) -> list[str]:
    lines = [_seed_line(table, seed_kind)]
    plain = table[~table["variant"].isin(DELTA_VARIANTS)]
    missing_cells = [
        _cell_name(objective, variant)
        for (objective, variant), cell in plain.groupby(["objective", "variant"], sort=False)
        if (cell["status"] == MISSING).all()
    ]
    lines.append(
        "Missing cells (no evaluation found): " + (", ".join(missing_cells) if missing_cells else "none")
    )
    incomplete = plain[plain["status"] == INCOMPLETE]
    if not incomplete.empty:
        names = ", ".join(
            _cell_name(o, v) for o, v in zip(incomplete["objective"], incomplete["variant"], strict=True)
        )
        lines.append(f"No average for {names}: a benchmark the other cells have was not measured there")
    single_seed: dict[str, str] = {}
    for benchmark, metric in TABLE1_BENCHMARKS.items():
        rows = plain[
            (plain["benchmark"] == benchmark) & (plain["metric"] == metric) & (plain["status"] == OK)
        ]
        single = rows[rows["n_seeds"] == 1]
        if rows.empty or single.empty:
            continue
        if len(single) == len(rows):
            single_seed[BENCHMARK_LABELS[benchmark]] = "every value is a single seed (no ±)"
        else:
            names = ", ".join(
                _cell_name(o, v) for o, v in zip(single["objective"], single["variant"], strict=True)
            )
            single_seed[BENCHMARK_LABELS[benchmark]] = f"single-seed rows (no ±): {names}"
    lines += [f"{labels}: {text}" for labels, text in _merged(single_seed)]
    return lines


def _merged(described: Mapping[str, str]) -> list[tuple[str, str]]:
    """``{"math": d, "ROUGE-L": d}`` -> ``[("math, ROUGE-L", d)]``: one line for what reads the same."""
    by_text: dict[str, list[str]] = {}
    for label, text in described.items():
        by_text.setdefault(text, []).append(label)
    return [(", ".join(labels), text) for text, labels in by_text.items()]


def _seed_line(table: pd.DataFrame, seed_kind: str | None) -> str:
    training: Sequence[int] = table.attrs.get("training_seeds", [])
    if len(training) > 1:  # a grid of several training seeds in one run
        references = (
            "mean ± std over the kedro runs that evaluated them"
            if seed_kind == "training"  # runs compared from MLflow
            else "one model each: math greedy, ROUGE-L mean ± std over the sampling seeds"
        )
        return (
            f"Seeds: KD cells: mean ± std over {len(training)} training seeds ({', '.join(map(str, training))}), "
            f"each run's ROUGE-L the mean over its sampling seeds; teacher and students before KD: {references}"
        )
    seeds: Mapping[str, Sequence[str]] = table.attrs.get("seeds", {})
    if seed_kind is None:
        seed_kind = "sampling" if list(seeds.get(MATH, [])) == [GREEDY_SEED] else "training"
    described: dict[str, str] = {}
    for benchmark in (MATH, INSTRUCTION):
        used = [s for s in seeds.get(benchmark, []) if s != DETERMINISTIC_SEED]
        if used == [GREEDY_SEED]:
            described[benchmark] = "greedy, 1 decoding"
        elif used:
            # Without a logged seed a run id stands in for it: shorten it, the count is what matters.
            shown = ", ".join(seed if len(seed) <= 12 else seed[:8] + "…" for seed in used)
            described[benchmark] = f"mean ± std over {len(used)} {seed_kind} seeds ({shown})"
    parts = [f"{labels}: {text}" for labels, text in _merged(described)]
    if AVERAGE in set(table["benchmark"]):
        parts.append("average: mean of the benchmarks (per seed when they share seeds)")
    if not parts:
        return f"Seeds: up to {int(table['n_seeds'].max())} per value"
    return "Seeds: " + "; ".join(parts)


# --------------------------------------------------------------------------------------------- compact
def compact_markdown(table: pd.DataFrame, title: str = "Warmup-Distill: distillation results") -> str:
    """The accuracy of the table as one narrow table per benchmark, to read in a terminal: a row per KD
    objective, a column per variant that was distilled and per difference between them; the students
    before KD, the teacher and the variants only measured before KD (the fairness control) as reference
    rows below. The wide table, the distribution statistics and the notes stay in ``render_markdown``."""
    _check_table(table)
    plain, deltas = _plain_variants(table), _delta_variants(table)
    kd = table[~table["objective"].isin([TEACHER, BEFORE_KD])]
    columns = [v for v in [*plain, *deltas] if v in set(kd["variant"])]
    references = [v for v in plain if v not in columns]
    indexed = table.set_index(KEY)
    parts = [f"# {title}", ""]
    for benchmark, metric in TABLE1_BENCHMARKS.items():
        if not _has(table, benchmark, metric):
            continue

        def cells(
            objective: str, variants: Sequence[str], key: tuple[str, str] = (benchmark, metric)
        ) -> list:
            return [
                _format_value(lookup(indexed, objective, v, *key), key[1], is_difference(objective, v))
                for v in variants
            ]

        rows = [[objective, *cells(objective, columns)] for objective in kd["objective"].unique()]
        rows.append([OBJECTIVE_LABELS[BEFORE_KD], *cells(BEFORE_KD, columns)])
        blank = [""] * (len(columns) - 1)
        rows.append([TEACHER, *cells(TEACHER, [TEACHER]), *blank])
        rows += [[f"{v}, {OBJECTIVE_LABELS[BEFORE_KD]}", *cells(BEFORE_KD, [v]), *blank] for v in references]
        unit = " (%)" if metric in PERCENT_METRICS else ""
        header = [f"{BENCHMARK_LABELS.get(benchmark, benchmark)}{unit}", *columns]
        parts += [*_markdown_table(header, rows), ""]
    notes = "Mean ± std where there are 2 or more seeds; differences in points. " + INTERVALS_NOTE
    parts += textwrap.wrap(notes, width=100)
    parts += [f"{v}: measured before KD only (a reference row, not distilled)." for v in references]
    parts.append("Every column, the distribution statistics and the notes: report.md.")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------- summary
def summary_lines(table: pd.DataFrame) -> list[str]:
    """One line per difference (warmup - vanilla, ...) and accuracy benchmark, for logs and the README, e.g.
    ``warmup - vanilla on average (points): +0.4 (fkl), -1.2 (rkl), missing (akl); mean over objectives
    -0.4 (2 of 3); before KD -3.1``. The mean is over the KD objectives; before KD is the starting gap."""
    _check_table(table)
    lines = []
    baseline_rows = table[table["objective"].str.endswith("-sft") & (table["benchmark"] == MATH)]
    for variant, rows in baseline_rows.groupby("variant", sort=False):
        items = [
            f"{_signed_points(row)} ({row['objective'].removesuffix('-sft')})" for _, row in rows.iterrows()
        ]
        lines.append(f"objective - sft on {variant}, math (points): " + ", ".join(items))
    for delta in _delta_variants(table):
        minuend, subtrahend = delta.split("-", 1)
        for benchmark in (AVERAGE, MATH, INSTRUCTION):
            metric = TABLE1_BENCHMARKS[benchmark]
            rows = table[
                (table["variant"] == delta) & (table["benchmark"] == benchmark) & (table["metric"] == metric)
            ]
            if rows.empty:
                continue
            kd_rows = rows[rows["objective"] != BEFORE_KD]
            items = [f"{_signed_points(row)} ({row['objective']})" for _, row in kd_rows.iterrows()]
            ok = kd_rows[kd_rows["status"] == OK]
            text = f"{minuend} - {subtrahend} on {benchmark} (points): " + (", ".join(items) or "no KD cells")
            if not ok.empty:
                text += f"; mean over objectives {ok['mean'].mean() * 100:+.1f} ({len(ok)} of {len(kd_rows)})"
            before = rows[(rows["objective"] == BEFORE_KD) & (rows["status"] == OK)]
            if not before.empty:
                text += f"; before KD {before['mean'].iloc[0] * 100:+.1f}"
            lines.append(text)
    return lines


def _signed_points(row: pd.Series) -> str:
    """``+1.2``, or ``+1.2 [+0.3, +2.1] *`` with its interval (the mark: it excludes 0)."""
    return _format_value(row, "exact_match", signed=True)


# --------------------------------------------------------------------------------------------- explain
# A plot saved beside the report in the same run, linked from it: the report's dataset
# (datasets.ReportMarkdownDataset) rewrites `report-plot:<file>` into the path from the report's file.
PLOT_SCHEME = "report-plot:"
EXPLAIN_TITLE = "## What distillation moved (explain)"


def plot_link(filename: str) -> str:
    return PLOT_SCHEME + filename


def resolve_plot_links(markdown: str, version: str | None) -> str:
    """Each `report-plot:<file>` link as the path from the report's file to that plot, saved in the same
    run beside it: versioned (Kedro's `<folder>/report.md/<version>/report.md` and
    `<folder>/<file>/<version>/<file>`), `../../<file>/<version>/<file>`; unversioned, `<file>`."""
    if version is None:
        return re.sub(rf"{re.escape(PLOT_SCHEME)}([^)\s]+)", r"\1", markdown)
    return re.sub(rf"{re.escape(PLOT_SCHEME)}([^)\s]+)", rf"../../\1/{version}/\1", markdown)


def explain_section(
    changes: pd.DataFrame, rejected: pd.DataFrame | None, plots: Mapping[str, str]
) -> list[str]:
    """The report's explain section from the explain pipeline's tables: per objective and variant, the
    change after KD of KL(teacher || student) (with its split at the teacher's top token) and of NLL, by
    token class and by task; warmup's change before KD beside the classes the check rejected (`rejected`,
    None when warmup is not in the grid); each plot of `plots` ({objective or "warmup": file}) embedded."""
    overall = changes[(changes["task"] == ALL) & (changes["by"] == "class")]
    kd = overall[overall["objective"] != BEFORE_KD]
    tokens = int(overall["tokens"].max()) if not overall.empty else 0
    parts = [
        EXPLAIN_TITLE,
        "",
        f"Every model scored on the same held-out gold responses ({tokens} tokens); change = after - before, "
        "in nats per token. KL(teacher || student) splits exactly at the teacher's most likely token k: "
        "KL(p || q) = KL(b_p || b_q) + (1 - p_k) KL(p~ || q~), the first term about the top token against "
        "the rest, the second about the shape of the rest (docs/method.md).",
        "",
    ]
    if not kd.empty:
        parts += _explain_kd_tables(kd, changes)
    for objective in dict.fromkeys(kd["objective"]):
        if objective in plots:
            parts += [f"![{objective}: where KD moved the student]({plot_link(plots[objective])})", ""]
    warmup = overall[(overall["baseline"] == f"vanilla.{BEFORE_KD}") & (overall["objective"] == BEFORE_KD)]
    if rejected is not None and not warmup.empty:
        parts += _explain_warmup_table(warmup, rejected)
        if "warmup" in plots:
            parts += [f"![warmup: what it moved before KD]({plot_link(plots['warmup'])})", ""]
    no_kl = sorted(set(overall.loc[overall["delta_kl"].isna() & (overall["group"] == ALL), "comparison"]))
    if no_kl:
        parts += [f"- No KL for {', '.join(no_kl)}: a tokenizer differs from the teacher's (NLL only).", ""]
    return parts


def _explain_kd_tables(kd: pd.DataFrame, changes: pd.DataFrame) -> list[str]:
    totals = kd[kd["group"] == ALL]
    by_class = kd[kd["group"] != ALL]
    rows = []
    for _, total in totals.iterrows():
        mine = by_class[by_class["comparison"] == total["comparison"]]
        fell_most = mine.loc[mine["delta_kl"].idxmin(), "group"] if mine["delta_kl"].notna().any() else ""
        rows.append(
            [total["objective"], total["variant"],
             *(_delta(total[f"delta_{m}"]) for m in ("kl", "kl_top", "kl_rest", "nll")), fell_most]
        )  # fmt: skip
    header = ["objective", "variant", "KL", "KL top token", "KL rest", "NLL", "KL fell most on"]
    parts = [
        "Table 3. Change after KD over every token: KL(teacher || student), its two parts, NLL, and the "
        "token class whose KL fell most.",
        "",
        *_markdown_table(header, rows),
        "",
    ]
    classes = [c for c in TOKEN_CLASSES if c in set(by_class["group"])]
    parts += [
        "Table 4. Change after KD of KL / NLL by token class (every task).",
        "",
        *_markdown_table(
            ["objective", "variant", *classes], _explain_rows(totals, by_class, "group", classes)
        ),
        "",
    ]
    tasks = changes[(changes["by"] == "class") & (changes["group"] == ALL) & (changes["task"] != ALL)]
    task_names = sorted(set(tasks["task"]))
    if len(task_names) > 1:
        parts += [
            "Table 5. Change after KD of KL / NLL by task (every token).",
            "",
            *_markdown_table(
                ["objective", "variant", *task_names], _explain_rows(totals, tasks, "task", task_names)
            ),
            "",
        ]
    return parts


def _explain_rows(
    totals: pd.DataFrame, cells: pd.DataFrame, column: str, names: Sequence[str]
) -> list[list[str]]:
    """One row per comparison of `totals`: `KL / NLL` change in each of `names` (values of `column`)."""
    rows = []
    for _, total in totals.iterrows():
        mine = cells[cells["comparison"] == total["comparison"]].set_index(column)
        row = [total["objective"], total["variant"]]
        for name in names:
            row.append(
                f"{_delta(mine.loc[name, 'delta_kl'])} / {_delta(mine.loc[name, 'delta_nll'])}"
                if name in mine.index
                else ""
            )
        rows.append(row)
    return rows


def _explain_warmup_table(warmup: pd.DataFrame, rejected: pd.DataFrame) -> list[str]:
    variants = list(dict.fromkeys(warmup["variant"]))
    shares = rejected.set_index("token_class")
    header = ["token class", *(f"{v}: KL / NLL" for v in variants), "rejected (% of pairs)", "tokens (%)"]
    rows = []
    for token_class in [*TOKEN_CLASSES, ALL]:
        row = [token_class]
        for variant in variants:
            cell = warmup[(warmup["variant"] == variant) & (warmup["group"] == token_class)]
            row.append(
                f"{_delta(cell['delta_kl'].iloc[0])} / {_delta(cell['delta_nll'].iloc[0])}"
                if not cell.empty
                else ""
            )
        if token_class in shares.index:
            row += [f"{100 * shares.loc[token_class, 'rejected_share']:.1f}",
                    f"{100 * shares.loc[token_class, 'token_share']:.1f}"]  # fmt: skip
        else:
            row += [f"{int(shares['rejected'].sum())} pairs", "100.0"]
        rows.append(row)
    return [
        "### Warmup, before KD",
        "",
        "Table 6. What warmup moved before any KD: change of KL / NLL by token class, each student before KD "
        "- the vanilla one (control: warmup's steps as plain SFT), beside the classes of the tokens the "
        "check rejected in the corrected set (first rejected token of each pair; row all: the number of "
        "pairs) and their share of the rejected responses' tokens.",
        "",
        *_markdown_table(header, rows),
        "",
    ]


def _delta(value: float) -> str:
    return "missing" if pd.isna(value) else f"{value:+.3g}"
