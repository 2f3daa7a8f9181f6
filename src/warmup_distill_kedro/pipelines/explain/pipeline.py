"""The explain pipeline: what distillation moved, token by token, for every model of the flow
(grid.subjects, one training run per cell: the first seed's), on the held-out gold responses the evaluate
stage scores (core/evaluation/explain.py).

Node `<subject>.explain_<subject>` (grid.node_name) writes `<subject>.explain_tokens` (one record per gold
token). With vanilla and warmup in the grid, `explain_rejected_tokens` reads which token classes the check
stage rejected in the corrected set (`explain_rejected`). The report pipeline gathers each variant's
records with its results and summarises them (`summarize_explain`: means by token class, position and
task, `explain_table`; after - before for each cell against its variant's student before KD and, with
warmup in the grid, for the students before KD against the vanilla one, `explain_changes`; each change over
every token, `explain_metrics`), then plots and tabulates them. Nodes tagged `mlflow_artifacts` have their
outputs logged as artifacts of the MLflow run.
"""

from kedro.pipeline import Pipeline, node

from warmup_distill_kedro import grid
from warmup_distill_kedro.pipelines.explain.nodes import (
    explain_rejected_tokens,
    explain_teacher,
    student_explanation,
)

_SHARED = ["test_examples", "params:explain", "params:evaluate"]


def create_pipeline(**kwargs) -> Pipeline:
    cells = explained_cells()
    per_subject = sum((_explanation(subject) for subject in grid.subjects(cells)), Pipeline([]))
    rejected = []
    if compares_warmup(cells):
        rejected.append(
            node(
                explain_rejected_tokens,
                ["corrected_set", grid.STARTING_CHECKPOINTS["vanilla"]],
                "explain_rejected",
                name="explain_rejected_tokens",
                tags=["mlflow_artifacts"],
            )
        )
    return Pipeline([per_subject, *rejected], tags=["explain"])


def explained_cells() -> list[grid.Cell]:
    """What KD moved is read on one training run per cell: the first seed's (the report pools every seed)."""
    return grid.first_seed(grid.cells())


def compares_warmup(cells: list[grid.Cell]) -> bool:
    """Whether the grid measures both the vanilla and the warmup student before KD."""
    return {"vanilla", "warmup"} <= set(grid.starting_variants(cells))


def comparisons(cells: list[grid.Cell]) -> list[tuple[str, str]]:
    """(before, after) subjects: each cell against its variant's student before KD; with warmup in the
    grid, each other student before KD (warmup, the fairness control) against the vanilla one."""
    before = {v: f"{v}.{grid.BEFORE_KD}" for v in grid.starting_variants(cells)}
    pairs = [(before[cell.variant], cell.name) for cell in cells]
    if compares_warmup(cells):
        pairs += [(before["vanilla"], before[v]) for v in before if v != "vanilla"]
    return pairs


def _explanation(subject: grid.Subject) -> Pipeline:
    """One namespaced node: `<subject>.explain_<subject>` reads the subject's checkpoint, writes its records."""
    is_teacher = subject.variant == grid.TEACHER
    teacher = [] if is_teacher else ["teacher_model"]
    template = Pipeline(
        [
            node(
                explain_teacher if is_teacher else student_explanation(subject),
                ["model", *teacher, *_SHARED],
                "explain_tokens",
                name=grid.node_name("explain", subject.name),
                tags=[f"variant.{subject.variant}", f"objective.{subject.objective}"],
            )
        ]
    )
    return Pipeline(
        template,
        namespace=subject.name,
        inputs={"model": subject.checkpoint, "test_examples": "test_examples", **{t: t for t in teacher}},
        parameters={"params:explain", "params:evaluate"},
    )
