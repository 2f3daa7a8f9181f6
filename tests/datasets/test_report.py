"""datasets/report.py: the report's Markdown links to the plots saved in the same run, by their version."""

from __future__ import annotations

from pathlib import Path

import pytest
from kedro.io import DatasetError
from kedro.io.core import Version
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from warmup_distill_kedro.datasets import AtomicMatplotlibDataset, ReportMarkdownDataset
from warmup_distill_kedro.reporting.markdown import plot_link

VERSION = "2026-01-01T00.00.00.000Z"


def test_a_versioned_report_links_to_the_plot_of_its_own_version(tmp_path: Path):
    figure = Figure()
    FigureCanvasAgg(figure)
    AtomicMatplotlibDataset(
        filepath=str(tmp_path / "report_explain_fkl.png"), version=Version(None, VERSION)
    ).save(figure)
    report = ReportMarkdownDataset(filepath=str(tmp_path / "report.md"), version=Version(None, VERSION))
    report.save(f"# Report\n\n![fkl]({plot_link('report_explain_fkl.png')})\n")

    saved = tmp_path / "report.md" / VERSION / "report.md"
    link = saved.read_text().split("](")[1].rstrip(")\n")
    assert link == f"../../report_explain_fkl.png/{VERSION}/report_explain_fkl.png"
    assert (saved.parent / link).resolve().is_file()  # the path a Markdown viewer follows
    with pytest.raises(DatasetError, match="must not exist"):
        report.save("# again")  # a version is never rewritten


def test_an_unversioned_report_links_to_the_plot_beside_it(tmp_path: Path):
    report = ReportMarkdownDataset(filepath=str(tmp_path / "report.md"))
    report.save(f"![fkl]({plot_link('report_explain_fkl.png')})")
    assert (tmp_path / "report.md").read_text() == "![fkl](report_explain_fkl.png)"
