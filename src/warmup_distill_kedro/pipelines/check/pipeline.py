from kedro.pipeline import Pipeline, node

from warmup_distill_kedro.pipelines.check.nodes import (
    build_corrected_set,
    plot_teacher_probabilities,
    score_rollouts,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                score_rollouts,
                ["rollouts", "teacher_model", "params:check"],
                "scored_rollouts",
                name="teacher_scores_rollouts",
            ),
            node(
                build_corrected_set,
                ["scored_rollouts", "teacher_model", "params:check"],
                ["corrected_set", "check_summary"],
                name="teacher_corrects_rollouts",
            ),
            node(
                plot_teacher_probabilities,
                ["scored_rollouts", "params:check"],
                "teacher_prob_histogram",
                name="plot_teacher_probabilities",
            ),
        ],
        tags=["check"],
    )
