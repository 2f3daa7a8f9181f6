from kedro.pipeline import Pipeline, node

from warmup_distill_kedro.pipelines.data.nodes import build_examples, split


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(build_examples, "params:data", "examples", name="build_examples"),
            node(
                split,
                ["examples", "params:data"],
                ["train_examples", "validation_examples", "test_examples"],
                name="split_examples",
            ),
        ]
    )
