"""The distill grid: one namespaced copy of the KD node per (student variant, objective).

Node `vanilla.fkl.distill` reads `student_model`, node `warmup.fkl.distill` reads `student_warmup`; both
read the same teacher, KD set (`kd_examples`) and `params:distill`, and write
`<variant>.<objective>.student` and `<variant>.<objective>.distill_metrics` (catalog factories). The
plain-SFT baseline (objective `sft`) reads `sft_examples`, the gold examples the student has, instead. Run one cell with
`kedro run --pipeline=distill --params="distill.variants=[warmup],distill.objectives=[fkl]"`, or with
`--namespaces=warmup.fkl`.
"""

from kedro.pipeline import Pipeline, node

from warmup_distill_kedro.grid import STARTING_CHECKPOINTS, grid_cells
from warmup_distill_kedro.pipelines.distill.nodes import (
    cell_function,
    prepare_kd_examples,
    prepare_sft_examples,
)
from warmup_distill_kedro.pipelines.distill.params import BASELINE_OBJECTIVES

_SHARED_INPUTS = ("teacher_model", "kd_examples", "sft_examples", "validation_examples")  # not namespaced


def create_pipeline(**kwargs) -> Pipeline:
    cells = grid_cells()
    shared = [
        node(
            prepare_kd_examples,
            ["teacher_model", "train_examples", "params:distill"],
            "kd_examples",
            name="prepare_kd_examples",
            tags=["distill"],
        )
    ]
    if any(objective in BASELINE_OBJECTIVES for _, objective in cells):
        shared.append(
            node(
                prepare_sft_examples,
                ["train_examples", "params:distill"],
                "sft_examples",
                name="prepare_sft_examples",
                tags=["distill"],
            )
        )
    return sum((_cell(variant, objective) for variant, objective in cells), Pipeline(shared))


def _cell(variant: str, objective: str) -> Pipeline:
    # The sft baseline trains on the gold examples; every KD objective on the shared KD set.
    examples = "sft_examples" if objective in BASELINE_OBJECTIVES else "kd_examples"
    template = Pipeline(
        [
            node(
                cell_function(variant, objective),
                ["teacher_model", "student_start", examples, "validation_examples", "params:distill"],
                ["student", "distill_metrics"],
                name="distill",
                tags=["distill", "training", f"variant.{variant}", f"objective.{objective}"],
            )
        ]
    )
    return Pipeline(
        template,
        namespace=f"{variant}.{objective}",
        inputs={
            "student_start": STARTING_CHECKPOINTS[variant],
            **{name: name for name in _SHARED_INPUTS if name in template.inputs()},
        },
        parameters={"params:distill"},
    )
