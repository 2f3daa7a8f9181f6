"""The report pipeline: the table of objective x variant, and the plots, from the evaluate outputs.

Inputs follow the grid (grid.py), like the distill and evaluate pipelines; the KD-curve plot compares the
variants on the grid's first objective.
"""

import warnings

from kedro.pipeline import Pipeline, node

from warmup_distill_kedro import grid
from warmup_distill_kedro.pipelines.explain.pipeline import compares_warmup
from warmup_distill_kedro.pipelines.report.nodes import (
    curves_function,
    explain_plot_function,
    explain_section_function,
    plot_accuracy,
    plot_explain_warmup,
    plot_warmup_mismatch,
    report_function,
)

# The report's Markdown before its explain section (in memory: `add_explain_section` writes report_markdown).
REPORT_TABLES = "report_tables_markdown"


def create_pipeline(**kwargs) -> Pipeline:
    cells = grid.cells()
    subjects = [subject.name for subject in grid.subjects(cells)]
    variants = grid.variants_of(cells)
    with warnings.catch_warnings():
        # The report reads the grid's outputs by the full names their namespaces give them
        # (`warmup.fkl.evaluation_metrics`); Kedro warns about any dotted name outside a namespace.
        warnings.filterwarnings("ignore", message="One or more dataset names contain '.'")
        nodes = [*_nodes(subjects, variants, cells[0].objective), *_explain_nodes(cells)]
        return Pipeline(nodes, tags=["report"])


def _nodes(subjects: list[str], variants: list[str], first_objective: str) -> list:
    nodes = [
        node(
            report_function(subjects),
            ["params:distill", *(f"{s}.evaluation_metrics" for s in subjects)],
            ["report_table", REPORT_TABLES],
            name="build_report",
        ),
        node(plot_accuracy, "report_table", "report_accuracy_plot", name="plot_accuracy"),
        node(
            curves_function(variants, first_objective),
            [f"{variant}.{first_objective}.distill_metrics" for variant in variants],
            "report_kd_curves_plot",
            name="plot_kd_curves",
        ),
    ]
    if "warmup" in variants:
        before_warmup, after_warmup = (
            f"{v}.{grid.BEFORE_KD}.evaluation_metrics" for v in ("vanilla", "warmup")
        )
        nodes.append(
            node(
                plot_warmup_mismatch,
                [before_warmup, after_warmup, "params:check"],
                "report_warmup_mismatch_plot",
                name="plot_warmup_mismatch",
            )
        )
    return nodes


def _explain_nodes(cells: list[grid.Cell]) -> list:
    """One plot per objective of where KD moved the students, warmup's plot when it is compared, and the
    report's explain section embedding them (explain pipeline's tables in)."""
    objectives = list(dict.fromkeys(cell.objective for cell in cells))
    plots = {objective: f"explain_{objective}" for objective in objectives}
    rejected = []
    if compares_warmup(cells):
        plots["warmup"] = "explain_warmup"
        rejected = ["explain_rejected"]
    nodes = [
        node(
            explain_plot_function(objective),
            "explain_changes",
            f"report_{plots[objective]}_plot",
            name=f"plot_explain_{objective}",
            tags=["mlflow_artifacts"],
        )
        for objective in objectives
    ]
    if rejected:
        nodes.append(
            node(
                plot_explain_warmup,
                ["explain_changes", *rejected],
                "report_explain_warmup_plot",
                name="plot_explain_warmup",
                tags=["mlflow_artifacts"],
            )
        )
    nodes.append(
        node(
            explain_section_function({key: f"report_{name}.png" for key, name in plots.items()}),
            [REPORT_TABLES, "explain_changes", *rejected],
            "report_markdown",
            name="add_explain_section",
        )
    )
    return nodes
