"""reporting/markdown.py: the Markdown report of the table (main table, distribution table, footer) and
the summary lines the report node logs."""

from __future__ import annotations

from tests.helpers import markdown_rows
from warmup_distill_kedro.reporting.markdown import render_markdown, summary_lines


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
