import re

import pytest
from pydantic import ValidationError

from warmup_distill_kedro.core.tasks import (
    COLUMNS,
    TEMPLATE_NAMES,
    InstructionTaskConfig,
    TaskDataError,
    build_prompt,
    check_instruction_answer,
    generate_instructions,
    validate_table,
)
from warmup_distill_kedro.core.tasks.instruction_task import CITIES, PEOPLE


@pytest.fixture(scope="module")
def table():
    return generate_instructions(InstructionTaskConfig(n_examples=700, seed=5))


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


def test_schema_and_uniqueness(table):
    assert list(table.columns) == COLUMNS
    assert validate_table(table, "instruction") is table
    assert len(table) == 700 and table["prompt"].is_unique and table["example_id"].is_unique
    assert set(table["task"]) == {"instruction"}
    for row in table.itertuples():
        assert row.prompt == build_prompt("instruction", row.instruction, row.context)
        assert row.prompt == f"Instruction: {row.instruction}\nContext: {row.context}\nResponse:"


def test_same_seed_same_table_other_seed_other_table():
    config = InstructionTaskConfig(n_examples=60, seed=11)
    first = generate_instructions(config).to_dict("records")
    assert generate_instructions(config).to_dict("records") == first
    other = generate_instructions(config.model_copy(update={"seed": 12}))
    assert other["prompt"].tolist() != [row["prompt"] for row in first]


def test_every_response_and_reference_passes_the_checker(table):
    for row in table.itertuples():
        references = list(row.references)
        assert references[0] == row.response and len(references) == 2 and row.answer in references
        assert all(check_instruction_answer(row.answer, reference) for reference in references)


def test_answers_are_right_for_their_contexts(table):
    """Recompute each template's answer from the context, independently of the generator."""
    seen = set()
    for row in table.itertuples():
        instruction = row.instruction.lower()
        if "sort" in instruction:
            expected = ", ".join(map(str, sorted(_numbers(row.context))))
            seen.add("sort")
        elif "largest" in instruction:
            expected = str(max(_numbers(row.context)))
            seen.add("largest")
        elif "reverse" in instruction:
            expected = ", ".join(reversed(_words(row.context)))
            seen.add("reverse")
        elif "words" in instruction and ("how many" in instruction or "count" in instruction):
            expected = str(len(row.context.split()))
            seen.add("count")
        elif "upper case" in instruction or "capital" in instruction:
            expected = ", ".join(word.upper() for word in _words(row.context))
            seen.add("upper")
        elif "city" in instruction:
            expected = next(word for word in _words(row.context) if word in CITIES)
            seen.add("city")
        else:
            assert "who" in instruction or "person" in instruction, row.instruction
            names = [word for word in _words(row.context) if word in PEOPLE]
            assert len(names) == 1
            expected = names[0]
            seen.add("person")
        assert row.answer == expected, row
    assert seen == set(TEMPLATE_NAMES)


def test_phrasing_variation_sets_the_share_of_sentence_responses():
    def sentence_share(variation: float) -> float:
        table = generate_instructions(
            InstructionTaskConfig(n_examples=300, seed=0, phrasing_variation=variation)
        )
        return float((table["response"] != table["answer"]).mean())

    assert sentence_share(0.0) == 0.0
    assert sentence_share(1.0) == 1.0
    assert 0.35 < sentence_share(0.5) < 0.65


def test_templates_and_list_lengths_follow_the_config():
    config = InstructionTaskConfig(
        n_examples=100, seed=0, templates=["largest"], min_list_length=4, max_list_length=4, max_number=9
    )
    table = generate_instructions(config)
    assert table["instruction"].str.contains("largest").all()
    assert all(len(_numbers(c)) == 4 and max(_numbers(c)) <= 9 for c in table["context"])


@pytest.mark.parametrize(
    ("answer", "prediction", "expected"),
    [
        ("9", "9", True),
        ("9", " The largest number is 9. ", True),
        ("9", "the answer is 9", True),
        ("9", "19", False),
        ("9", "The largest number is 19.", False),
        ("9", "2, 7, 9", False),
        ("9", "", False),
        ("2, 7, 9", "2 7 9", True),
        ("2, 7, 9", "The sorted numbers are 2, 7, 9.", True),
        ("2, 7, 9", "The sorted numbers are 1, 2, 7, 9.", False),
        ("2, 7, 9", "2, 9, 7", False),
        ("Paris", "paris", True),
        ("Paris", "The city mentioned is Paris.", True),
        ("Paris", "The city mentioned is Rome.", False),
        ("RED, CAT", "RED CAT", True),
        ("RED, CAT", "The words in upper case are RED, CAT.", True),
        ("RED, CAT", "red, cat", False),
        ("sun, cat, red", "The reversed words are sun, cat, red.", True),
        ("sun, cat, red", "The reversed words are dog, sun, cat, red.", False),
    ],
)
def test_check_instruction_answer(answer, prediction, expected):
    assert check_instruction_answer(answer, prediction) is expected


def test_too_small_a_space_raises_a_clear_error():
    # 20 people x 20 cities x 5 sentences x 2 instructions = 4000 distinct prompts at most.
    with pytest.raises(TaskDataError, match=r"n_examples=5000.*person"):
        generate_instructions(InstructionTaskConfig(n_examples=5000, templates=["person"]))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"n_examples": -1}, "n_examples"),
        ({"templates": ["poem"]}, "templates"),
        ({"templates": []}, "templates"),
        ({"phrasing_variation": -0.1}, "phrasing_variation"),
        ({"min_list_length": 6, "max_list_length": 4}, "min_list_length"),
        ({"max_number": 3}, "max_number"),
        ({"list_length": 3}, "list_length"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValidationError, match=field):
        InstructionTaskConfig(**({"n_examples": 10} | changes))
