"""The evaluate pipeline: the same measurements for every model of the flow.

Subjects: the teacher, the students before KD (`student` = vanilla, `warmup_student`, and the
fairness control `control_student` whenever warmup is in the grid) and every distilled student of the grid
(node `<variant>.<objective>.evaluate`, subject `<variant>.<objective>`). Each writes
`<subject>.evaluation_metrics` and `<subject>.predictions`. A node's first input is the model it
measures: for nodes tagged `evaluation` the MLflow hook logs the metrics to the run that trained it.
"""

from kedro.pipeline import Pipeline, node

from warmup_distill_kedro.grid import STARTING_CHECKPOINTS, grid_cells
from warmup_distill_kedro.pipelines.evaluate.nodes import evaluate_teacher, student_evaluation

# The student each variant starts distillation from, evaluated before KD under this subject name.
STUDENT_SUBJECTS: dict[str, str] = {
    "vanilla": "student",
    "warmup": "warmup_student",
    "control": "control_student",
}
_SHARED = ["test_examples", "params:evaluate", "params:check"]


def create_pipeline(**kwargs) -> Pipeline:
    cells = grid_cells()
    subjects = [
        _subject("teacher", evaluate_teacher, "teacher_model", "teacher", "teacher", with_teacher=False),
        *(
            _subject(STUDENT_SUBJECTS[v], None, STARTING_CHECKPOINTS[v], v, "before_kd")
            for v in students_before_kd(cells)
        ),
        *(
            _subject(f"{variant}.{objective}", None, f"{variant}.{objective}.student", variant, objective)
            for variant, objective in cells
        ),
    ]
    return sum(subjects, Pipeline([]))


def students_before_kd(cells: list[tuple[str, str]]) -> list[str]:
    """The variants whose starting student is evaluated: the grid's, plus the fairness control whenever
    warmup is in the grid (it is trained with the warmup student; its row says what warmup's extra steps
    alone would have given)."""
    variants = [variant for variant, _ in cells]
    if "warmup" in variants:
        variants.append("control")
    return list(dict.fromkeys(variants))


def _subject(
    subject: str, function, model: str, variant: str, objective: str, with_teacher: bool = True
) -> Pipeline:
    """One namespaced node: `<subject>.evaluate` reads `model`, writes `<subject>.evaluation_metrics`."""
    teacher = ["teacher_model"] if with_teacher else []
    template = Pipeline(
        [
            node(
                function or student_evaluation(subject, variant, objective),
                ["model", *teacher, *_SHARED],
                ["evaluation_metrics", "predictions"],
                name="evaluate",
                tags=["evaluate", "evaluation", f"variant.{variant}", f"objective.{objective}"],
            )
        ]
    )
    return Pipeline(
        template,
        namespace=subject,
        inputs={"model": model, "test_examples": "test_examples", **{t: t for t in teacher}},
        parameters={"params:evaluate", "params:check"},
    )
