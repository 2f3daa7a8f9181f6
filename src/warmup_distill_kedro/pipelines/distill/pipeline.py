"""The distill grid: one namespaced copy of the KD node per (student variant, objective) cell (grid.py).

Node `vanilla.fkl.distill_vanilla_fkl` reads `student_model`, `warmup.fkl.distill_warmup_fkl` reads
`student_warmup`; both
read the same teacher, KD set (`kd_examples`) and `params:distill`, and write
`<variant>.<objective>.student` and `<variant>.<objective>.distill_metrics` (catalog factories). The
plain-SFT baseline (objective `sft`) reads `sft_examples`, the gold examples the student has, instead.
With `distill.teacher_cache.enabled`, node `cache_teacher_logits` runs the teacher once over the KD set and
the token-level cells read its top-k (`teacher_topk`) instead of running the teacher every step. Run one
cell with `kedro run --pipeline=distill --namespaces=warmup.fkl`. With several training seeds
(`distill.seeds`), each seed's run is a namespace inside the cell (`warmup.fkl.seed1`, grid.py).
"""

from kedro.pipeline import Pipeline, node

from warmup_distill_kedro import grid
from warmup_distill_kedro.pipelines.distill.nodes import (
    cell_function,
    kd_examples,
    sft_examples,
    teacher_topk,
)

# not namespaced: one of each for the whole grid
_SHARED_INPUTS = ("teacher_model", "kd_examples", "sft_examples", "validation_examples", "teacher_topk")


def create_pipeline(**kwargs) -> Pipeline:
    cells = grid.cells()
    shared = [
        node(
            kd_examples,
            ["teacher_model", "train_examples", "params:distill"],
            "kd_examples",
            name="prepare_kd_examples",
            tags=["distill"],
        )
    ]
    if any(cell.examples == "sft_examples" for cell in cells):
        shared.append(
            node(
                sft_examples,
                ["train_examples", "params:distill"],
                "sft_examples",
                name="prepare_sft_examples",
                tags=["distill"],
            )
        )
    cached = grid.teacher_cache_readers(cells)
    if cached:
        shared.append(
            node(
                teacher_topk,
                ["teacher_model", "kd_examples", "params:distill"],
                "teacher_topk",
                name="cache_teacher_logits",
                tags=["distill"],
            )
        )
    return sum((_cell(cell, cell in cached) for cell in cells), Pipeline(shared))


def _cell(cell: grid.Cell, reads_cache: bool) -> Pipeline:
    inputs = ["teacher_model", "student_start", cell.examples, "validation_examples", "params:distill"]
    template = Pipeline(
        [
            node(
                cell_function(cell),
                inputs + (["teacher_topk"] if reads_cache else []),
                ["student", "distill_metrics"],
                name=grid.node_name("distill", cell.name),
                tags=[
                    "distill",
                    "training",
                    *grid.run_tags(cell.variant, cell.objective, cell.seed if cell.seeded else None),
                ],
            )
        ]
    )
    return Pipeline(
        template,
        namespace=cell.name,
        inputs={
            "student_start": cell.start,
            **{name: name for name in _SHARED_INPUTS if name in template.inputs()},
        },
        parameters={"params:distill"},
    )
