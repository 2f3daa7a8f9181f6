import pandas as pd
import pytest
from pydantic import ValidationError

from warmup_distill_kedro.core.tasks import (
    SPLITS,
    InstructionTaskConfig,
    MathTaskConfig,
    SplitConfig,
    TaskDataError,
    generate_instructions,
    generate_math,
    split_examples,
)


@pytest.fixture(scope="module")
def examples():
    math = generate_math(MathTaskConfig(n_examples=400, seed=0))
    instructions = generate_instructions(InstructionTaskConfig(n_examples=200, seed=1))
    table = pd.concat([math, instructions], ignore_index=True)
    # Repeated prompts under new ids (as a user's file may have): they must stay in one split.
    repeats = table.sample(60, random_state=0).assign(example_id=lambda t: "copy-" + t["example_id"])
    return pd.concat([table, repeats], ignore_index=True)


def _assert_disjoint(table: pd.DataFrame, column: str) -> None:
    owners = table.groupby(column)["split"].nunique()
    assert (owners == 1).all(), owners[owners > 1].head()


def test_splits_are_disjoint_in_ids_and_prompts(examples):
    table = split_examples(examples, SplitConfig(validation_fraction=0.1, test_fraction=0.2, seed=0))
    assert len(table) == len(examples) and set(table["split"]) == set(SPLITS)
    assert table.drop(columns="split").equals(examples)
    _assert_disjoint(table, "example_id")
    _assert_disjoint(table, "prompt")
    sizes = table["split"].value_counts(normalize=True)
    assert sizes["test"] == pytest.approx(0.2, abs=0.02)
    assert sizes["validation"] == pytest.approx(0.1, abs=0.02)


def test_deterministic_for_a_seed_and_independent_of_row_order(examples):
    config = SplitConfig(validation_fraction=0.1, test_fraction=0.1, seed=4)
    first = split_examples(examples, config)
    assert split_examples(examples, config)["split"].tolist() == first["split"].tolist()
    shuffled = split_examples(examples.sample(frac=1, random_state=1), config)
    assert (
        shuffled.set_index("example_id")["split"]
        .sort_index()
        .equals(first.set_index("example_id")["split"].sort_index())
    )
    other = split_examples(examples, config.model_copy(update={"seed": 5}))
    assert other["split"].tolist() != first["split"].tolist()


def test_keyword_call_matches_config_call(examples):
    by_config = split_examples(examples, SplitConfig(validation_fraction=0.1, test_fraction=0.15, seed=2))
    by_arguments = split_examples(examples, validation_fraction=0.1, test_fraction=0.15, seed=2)
    assert by_config["split"].tolist() == by_arguments["split"].tolist()


def test_group_by_keeps_a_column_value_in_one_split(examples):
    table = split_examples(examples, validation_fraction=0.1, test_fraction=0.1, seed=0, group_by="answer")
    _assert_disjoint(table, "answer")
    _assert_disjoint(table, "prompt")
    assert set(table["split"]) == set(SPLITS)


def _tiny(n_prompts: int, copies: int = 2) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "example_id": [f"e{i}-{c}" for i in range(n_prompts) for c in range(copies)],
            "prompt": [f"prompt {i}" for i in range(n_prompts) for _ in range(copies)],
        }
    )


def test_three_groups_give_three_non_empty_splits_fewer_raise():
    table = split_examples(_tiny(3), SplitConfig(validation_fraction=0.01, test_fraction=0.01))
    assert table["split"].value_counts().to_dict() == {"train": 2, "validation": 2, "test": 2}
    with pytest.raises(TaskDataError, match=r"2 group\(s\).*train, validation, test"):
        split_examples(_tiny(2), SplitConfig(validation_fraction=0.3, test_fraction=0.3))


def test_a_zero_fraction_leaves_its_split_empty():
    table = split_examples(_tiny(2), SplitConfig(validation_fraction=0.3, test_fraction=0.0))
    assert sorted(set(table["split"])) == ["train", "validation"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"validation_fraction": 0.5, "test_fraction": 0.5}, "validation_fraction \\+ test_fraction"),
        ({"shuffle": True}, "shuffle"),
    ],
)
def test_split_config_errors_name_the_field(changes, field):
    with pytest.raises(ValidationError, match=field):
        SplitConfig(**changes)
