"""The report pipeline: the table of objective x variant, and the plots, from the evaluate outputs.

Inputs follow the grid (grid.py), like the distill and evaluate pipelines; the KD-curve plot compares the
variants on the grid's first objective.
"""

import warnings

from kedro.pipeline import Pipeline, node

from warmup_distill_kedro import grid
from warmup_distill_kedro.pipelines.report.nodes import (
    curves_function,
    plot_accuracy,
    plot_warmup_mismatch,
    report_function,
)


def create_pipeline(**kwargs) -> Pipeline:
    cells = grid.cells()
    subjects = [subject.name for subject in grid.subjects(cells)]
    variants = grid.variants_of(cells)
    with warnings.catch_warnings():
        # The report reads the grid's outputs by the full names their namespaces give them
        # (`warmup.fkl.evaluation_metrics`); Kedro warns about any dotted name outside a namespace.
        warnings.filterwarnings("ignore", message="One or more dataset names contain '.'")
        return Pipeline(_nodes(subjects, variants, cells[0].objective), tags=["report"])


def _nodes(subjects: list[str], variants: list[str], first_objective: str) -> list:
    nodes = [
        node(
            report_function(subjects),
            ["params:distill", *(f"{s}.evaluation_metrics" for s in subjects)],
            ["report_table", "report_markdown"],
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
