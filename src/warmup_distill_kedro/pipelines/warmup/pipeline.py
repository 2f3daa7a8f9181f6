from kedro.pipeline import Pipeline, node

from warmup_distill_kedro import grid
from warmup_distill_kedro.pipelines.warmup.nodes import control_student, warmup_student


def create_pipeline(**kwargs) -> Pipeline:
    # The teacher is loaded for the warmup only when it is DPO's reference (warmup.loss.reference: teacher).
    teacher = [grid.TEACHER_CHECKPOINT] if grid.warmup_reads_teacher() else []
    return Pipeline(
        [
            node(
                warmup_student,
                ["student_model", "corrected_set", "validation_examples", "params:warmup", *teacher],
                ["student_warmup", "warmup_metrics"],
                name="warmup_student",
                tags=["training"],
            ),
            node(
                control_student,
                ["student_model", "corrected_set", "train_examples", "validation_examples", "params:warmup"],
                ["student_control", "control_metrics"],
                name="control_student",
                tags=["training", "control"],
            ),
        ],
        tags=["warmup"],
    )
