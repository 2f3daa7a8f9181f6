"""The evaluate pipeline: the same measurements for every model of the flow (grid.subjects).

Subjects: the teacher, every variant's student before KD (`<variant>.before_kd`: the vanilla and warmup
students, and the fairness control whenever warmup is in the grid) and every distilled student of the
grid (`<variant>.<objective>`). Node `<subject>.evaluate_<subject>` (`vanilla.fkl.evaluate_vanilla_fkl`)
writes `<subject>.evaluation_metrics` and `<subject>.predictions`. A node's first input is the model it measures: for nodes tagged `evaluation` the
MLflow hook logs the metrics to the run that trained it.
"""

from kedro.pipeline import Pipeline, node

from warmup_distill_kedro import grid
from warmup_distill_kedro.pipelines.evaluate.nodes import evaluate_teacher, student_evaluation

_SHARED = ["test_examples", "params:evaluate", "params:check"]


def create_pipeline(**kwargs) -> Pipeline:
    return sum((_evaluation(subject) for subject in grid.subjects(grid.cells())), Pipeline([]))


def _evaluation(subject: grid.Subject) -> Pipeline:
    """One namespaced node: `<subject>.evaluate_<subject>` reads the subject's checkpoint, writes its metrics."""
    is_teacher = subject.variant == grid.TEACHER
    teacher = [] if is_teacher else ["teacher_model"]
    template = Pipeline(
        [
            node(
                evaluate_teacher if is_teacher else student_evaluation(subject),
                ["model", *teacher, *_SHARED],
                ["evaluation_metrics", "predictions"],
                name=grid.node_name("evaluate", subject.name),
                tags=[
                    "evaluate",
                    "evaluation",
                    *grid.run_tags(subject.variant, subject.objective, subject.seed),
                ],
            )
        ]
    )
    return Pipeline(
        template,
        namespace=subject.name,
        inputs={"model": subject.checkpoint, "test_examples": "test_examples", **{t: t for t in teacher}},
        parameters={"params:evaluate", "params:check"},
    )
