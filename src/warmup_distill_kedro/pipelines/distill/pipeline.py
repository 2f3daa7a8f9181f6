"""The distill grid: one namespaced copy of the KD node per (student variant, objective).

Node `vanilla.fkl.distill` reads `student_model`, node `warmup.fkl.distill` reads `student_warmup`; both
read the same teacher, data and `params:distill`, and write `<variant>.<objective>.student` and
`<variant>.<objective>.distill_metrics` (catalog factories). Run one cell with
`kedro run --pipeline=distill --params="distill.variants=[warmup],distill.objectives=[fkl]"`, or with
`--namespaces=warmup.fkl`.
"""

from kedro.pipeline import Pipeline, node

from warmup_distill_kedro.pipelines.distill.grid import STARTING_CHECKPOINTS, grid_cells
from warmup_distill_kedro.pipelines.distill.nodes import cell_function, prepare_kd_examples

_SHARED_INPUTS = ("teacher_model", "kd_examples", "validation_examples")  # not namespaced


def create_pipeline(**kwargs) -> Pipeline:
    shared = Pipeline(
        [
            node(
                prepare_kd_examples,
                ["teacher_model", "train_examples", "params:distill"],
                "kd_examples",
                name="prepare_kd_examples",
                tags=["distill"],
            )
        ]
    )
    return sum((_cell(variant, objective) for variant, objective in grid_cells()), shared)


def _cell(variant: str, objective: str) -> Pipeline:
    template = Pipeline(
        [
            node(
                cell_function(variant, objective),
                ["teacher_model", "student_start", "kd_examples", "validation_examples", "params:distill"],
                ["student", "distill_metrics"],
                name="distill",
                tags=["distill", "training", f"variant.{variant}", f"objective.{objective}"],
            )
        ]
    )
    return Pipeline(
        template,
        namespace=f"{variant}.{objective}",
        inputs={"student_start": STARTING_CHECKPOINTS[variant], **{name: name for name in _SHARED_INPUTS}},
        parameters={"params:distill"},
    )
