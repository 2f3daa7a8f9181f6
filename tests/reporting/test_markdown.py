"""reporting/markdown.py: the Markdown report of the table (main table, distribution table, footer), the
summary lines the report node logs, and the explain section with its plot links."""

from __future__ import annotations

import pandas as pd

from tests.helpers import evaluation, explain_changes_table, markdown_rows
from warmup_distill_kedro.reporting.markdown import (
    explain_section,
    plot_link,
    render_markdown,
    resolve_plot_links,
    summary_lines,
)
from warmup_distill_kedro.reporting.records import evaluation_records
from warmup_distill_kedro.reporting.table import build_table


def test_markdown_shows_the_main_table(table):
    markdown = render_markdown(table, title="Demo results")
    assert markdown.startswith("# Demo results\n")
    header = markdown_rows(markdown, "objective")[0]
    assert header[:4] == ["objective", "math EM: vanilla", "math EM: warmup", "math EM: warmup-vanilla"]
    assert "average: warmup-vanilla" in header
    teacher = markdown_rows(markdown, "teacher")[0]
    assert teacher[1:4] == ["90.0", "", ""]  # the teacher's value sits in the first variant column only
    assert teacher[4] == "61.0 ± 1.0"
    fkl = markdown_rows(markdown, "fkl")[0]
    assert fkl[1:4] == ["40.0", "44.0", "+4.0"]
    assert fkl[4:7] == ["51.0 ± 1.0", "52.0 ± 2.0", "+1.0 ± 2.2"]
    assert fkl[7:10] == ["45.5", "48.0", "+2.5"]
    akl = markdown_rows(markdown, "akl")[0]
    assert set(akl[1:]) == {"missing"}
    assert markdown_rows(markdown, "before KD")[0][3] == "-2.0"


def test_markdown_distribution_table_and_footer(table):
    markdown = render_markdown(table)
    distribution = {cells[1]: cells for cells in markdown_rows(markdown, "fkl") if len(cells) == 6}
    assert distribution["vanilla"][2:] == ["0.125", "7.0", "0.300", "0.200"]
    teacher = [cells for cells in markdown_rows(markdown, "teacher") if len(cells) == 6][0]
    assert teacher[2] == ""  # heldout_kl not measured for the teacher: empty, not "missing"
    assert (
        "Seeds: math: greedy, 1 decoding; instruction: mean ± std over 3 sampling seeds (0, 1, 2)" in markdown
    )
    assert "Missing cells (no evaluation found): warmup/rkl, vanilla/akl, warmup/akl" in markdown
    assert "math EM, average: every value is a single seed (no ±)" in markdown  # instruction has 3 seeds


def test_summary_lines(table):
    lines = summary_lines(table)
    assert lines[0] == (
        "warmup - vanilla on average (points): +2.5 (fkl), missing (rkl), missing (akl); "
        "mean over objectives +2.5 (1 of 3); before KD -2.0"
    )
    assert [line.split(" (points)")[0] for line in lines] == [
        "warmup - vanilla on average",
        "warmup - vanilla on math",
        "warmup - vanilla on instruction",
    ]


# --------------------------------------------------------------------------------------------- explain
KD_PAIRS = [("vanilla.before_kd", "vanilla.fkl"), ("vanilla.before_kd", "vanilla.rkl")]
WARMUP_PAIRS = [("vanilla.before_kd", "warmup.before_kd")]
REJECTED = pd.DataFrame({"token_class": ["digit", "operator", "eos", "formatting", "word"],
                         "rejected": [3, 1, 0, 0, 0], "rejected_share": [0.75, 0.25, 0.0, 0.0, 0.0],
                         "token_share": [0.5, 0.1, 0.1, 0.2, 0.1]})  # fmt: skip


def test_the_explain_section_tabulates_the_changes_and_embeds_the_plots():
    kl = {"vanilla.before_kd": 0.4, "vanilla.fkl": 0.1, "vanilla.rkl": 0.5, "warmup.before_kd": 0.3}
    changes = explain_changes_table(kl, KD_PAIRS + WARMUP_PAIRS)
    plots = {"fkl": "report_explain_fkl.png", "warmup": "report_explain_warmup.png"}
    markdown = "\n".join(explain_section(changes, REJECTED, plots))
    assert markdown.startswith("## What distillation moved (explain)")
    assert "(5 tokens)" in markdown
    # Table 3: every token; a quarter of the KL change on the top token, the rest on the rest.
    assert markdown_rows(markdown, "fkl")[0] == [
        "fkl",
        "vanilla",
        "-0.3",
        "-0.075",
        "-0.225",
        "-0.6",
        "digit",
    ]
    assert markdown_rows(markdown, "rkl")[0][2:6] == ["+0.1", "+0.025", "+0.075", "+0.2"]
    # Table 4 by class, table 5 by task: KL / NLL.
    by_class, by_task = markdown_rows(markdown, "fkl")[1:3]
    assert by_class == ["fkl", "vanilla", *["-0.3 / -0.6"] * 4]
    assert by_task == ["fkl", "vanilla", "-0.3 / -0.6", "-0.3 / -0.6"]
    assert "![fkl: where KD moved the student](report-plot:report_explain_fkl.png)" in markdown
    assert "report_explain_rkl" not in markdown  # no plot given for rkl
    # Warmup: its change by class beside what the check rejected.
    assert markdown_rows(markdown, "digit")[-1] == ["digit", "-0.1 / -0.2", "75.0", "50.0"]
    assert markdown_rows(markdown, "all")[-1] == ["all", "-0.1 / -0.2", "4 pairs", "100.0"]
    assert "(report-plot:report_explain_warmup.png)" in markdown
    assert "No KL for" not in markdown


def test_the_explain_section_names_models_without_kl_and_leaves_warmup_out_without_it():
    kl = {"vanilla.before_kd": float("nan"), "vanilla.fkl": float("nan")}
    markdown = "\n".join(explain_section(explain_changes_table(kl, KD_PAIRS[:1]), None, {}))
    assert markdown_rows(markdown, "fkl")[0] == ["fkl", "vanilla", "missing", "missing", "missing", "+0", ""]
    assert "- No KL for vanilla.fkl: a tokenizer differs from the teacher's (NLL only)." in markdown
    assert "Warmup" not in markdown


def test_plot_links_resolve_to_the_plots_of_the_same_version():
    markdown = f"![a]({plot_link('report_explain_fkl.png')}) and ![b]({plot_link('x.png')})"
    assert resolve_plot_links(markdown, "2026-01-01T00.00.00.000Z") == (
        "![a](../../report_explain_fkl.png/2026-01-01T00.00.00.000Z/report_explain_fkl.png) and "
        "![b](../../x.png/2026-01-01T00.00.00.000Z/x.png)"
    )
    assert resolve_plot_links(markdown, None) == "![a](report_explain_fkl.png) and ![b](x.png)"


def test_the_flexible_math_score_has_its_own_table_beside_the_headline():
    evaluations = {
        "teacher": evaluation("teacher", "teacher", "teacher", 0.9, kl=None),
        "vanilla.fkl": evaluation("vanilla.fkl", "vanilla", "fkl", 0.40),
        "warmup.fkl": evaluation("warmup.fkl", "warmup", "fkl", 0.44),
    }
    for name, flexible in (("teacher", 0.95), ("vanilla.fkl", 0.52), ("warmup.fkl", 0.50)):
        evaluations[name]["math"]["flexible_match"] = flexible
    table = build_table(evaluation_records(evaluations), ["vanilla", "warmup"], ["fkl"])
    markdown = render_markdown(table)
    flexible = markdown[markdown.index("Table 1b.") : markdown.index("Table 2.")]
    assert "strict `#### N` match, the headline" in flexible
    [fkl] = markdown_rows(flexible, "fkl")
    [teacher] = markdown_rows(flexible, "teacher")
    assert fkl[1:4] == ["52.0", "50.0", "-2.0"] and teacher[1] == "95.0"
    assert "52.0" not in markdown[: markdown.index("Table 1b.")]  # Table 1 stays strict
