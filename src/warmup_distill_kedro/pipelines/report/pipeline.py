"""The report pipeline: the table of objective x variant, and the plots, from the evaluate outputs.

Inputs follow the grid (grid.py), like the distill and evaluate pipelines. Each variant's node
`<variant>.collect_<variant>` (in the variant's namespace) gathers its subjects' evaluations and
predictions and its cells' training metrics into `<variant>.results`; the report reads the teacher's
evaluation and one results per variant, so that in kedro-viz the grid collapses to one box per variant.
The KD-curve plot compares the variants on the grid's first objective.
"""

import warnings

from kedro.pipeline import Pipeline, node

from warmup_distill_kedro import grid
from warmup_distill_kedro.pipelines.explain.pipeline import compares_warmup, comparisons, explained_cells
from warmup_distill_kedro.pipelines.report.nodes import (
    build_report,
    collect_function,
    curves_function,
    explain_plot_function,
    explain_section_function,
    explain_summary_function,
    plot_accuracy,
    plot_explain_warmup,
    plot_warmup_mismatch,
    render_compact,
)

TEACHER_EVALUATION = f"{grid.TEACHER}.evaluation_metrics"
# The report's Markdown before its explain section (in memory: `add_explain_section` writes report_markdown).
REPORT_TABLES = "report_tables_markdown"


def create_pipeline(**kwargs) -> Pipeline:
    cells = grid.cells()
    subjects = grid.subjects(cells)
    explained = [s.name for s in grid.subjects(explained_cells())]
    variants = grid.starting_variants(cells)
    with warnings.catch_warnings():
        # The report reads the teacher's evaluation and explain records by their full names
        # (`teacher.evaluation_metrics`); Kedro warns about any dotted name outside a namespace.
        warnings.filterwarnings("ignore", message="One or more dataset names contain '.'")
        collectors = [_collector(variant, subjects, cells, explained) for variant in variants]
        report = Pipeline(
            [
                *_nodes(variants, grid.variants_of(cells), grid.first_seed(cells)),
                _explain_summary(explained_cells(), variants),
                *_explain_nodes(cells),
            ]
        )
        return Pipeline([*collectors, report], tags=["report"])


def _collector(
    variant: str, subjects: list[grid.Subject], cells: list[grid.Cell], explained: list[str]
) -> Pipeline:
    """`<variant>.collect_<variant>`: the variant's evaluations, predictions, training metrics and explain
    records (of its `explained` subjects)."""
    own_subjects = [s.name for s in subjects if s.variant == variant]
    own_cells = [c.name for c in cells if c.variant == variant]
    own_explained = [s for s in explained if s.split(".")[0] == variant]
    inputs = [
        *(f"{s}.evaluation_metrics" for s in own_subjects),
        *(f"{s}.predictions" for s in own_subjects),
        *(f"{c}.distill_metrics" for c in own_cells),
        *(f"{s}.explain_tokens" for s in own_explained),
    ]
    collect = node(
        collect_function(own_subjects, own_cells, own_explained),
        inputs,
        grid.results(variant),
        name=grid.node_name("collect", variant),
        namespace=variant,
    )
    return Pipeline([collect])


def _nodes(variants: list[str], grid_variants: list[str], first_runs: list[grid.Cell]) -> list:
    results = [grid.results(variant) for variant in variants]
    first_objective = first_runs[0].objective
    curves = {c.variant: c.name for c in first_runs if c.objective == first_objective}
    nodes = [
        node(
            build_report,
            ["params:distill", TEACHER_EVALUATION, *results],
            ["report_table", REPORT_TABLES],
            name="build_report",
        ),
        node(render_compact, "report_table", "report_compact", name="build_compact_report"),
        node(plot_accuracy, "report_table", "report_accuracy_plot", name="plot_accuracy"),
        node(
            curves_function(curves, first_objective),
            [grid.results(variant) for variant in curves],
            "report_kd_curves_plot",
            name="plot_kd_curves",
        ),
    ]
    if {"vanilla", "warmup"} <= set(grid_variants):  # the students before KD, before and after warmup
        nodes.append(
            node(
                plot_warmup_mismatch,
                [grid.results("vanilla"), grid.results("warmup"), "params:check"],
                "report_warmup_mismatch_plot",
                name="plot_warmup_mismatch",
            )
        )
    return nodes


def _explain_summary(explained: list[grid.Cell], variants: list[str]):
    """`summarize_explain`: the explain records of the teacher and of every variant (from its results)."""
    return node(
        explain_summary_function(comparisons(explained)),
        [f"{grid.TEACHER}.explain_tokens", *(grid.results(variant) for variant in variants)],
        ["explain_table", "explain_changes", "explain_metrics"],
        name="summarize_explain",
        tags=["mlflow_artifacts"],
    )


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
