"""The report's Markdown, whose links to the plots saved beside it name the run's version."""

from __future__ import annotations

from warmup_distill_kedro.datasets.atomic import AtomicTextDataset
from warmup_distill_kedro.reporting.markdown import resolve_plot_links


class ReportMarkdownDataset(AtomicTextDataset):
    """AtomicTextDataset for a report that embeds plots of its own run: each `report-plot:<file>` link
    (reporting.markdown.plot_link) is saved as the path from this version of the report to that version
    of the plot (`../../<file>/<version>/<file>`), so a Markdown viewer shows the plots of the same run.
    The plots are expected beside the report's filepath, versioned alike."""

    def save(self, data: str) -> None:
        super().save(resolve_plot_links(data, self.resolve_save_version() if self._version else None))
