from kedro.pipeline import Pipeline, node

from warmup_distill_kedro.pipelines.probe.nodes import probe


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [node(probe, ["student_model", "train_examples", "params:probe"], "rollouts", name="probe")],
        tags=["probe"],
    )
