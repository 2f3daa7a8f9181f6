"""Seeded Dolly-format tasks (instruction, context, response) whose answers can be checked exactly.

    Instruction: What is the largest number in the list?
    Context: 7, 2, 9
    Response: The largest number is 9.

Every template has a bare canonical answer ("9") and a sentence form ending in it ("The largest number
is 9."). The gold response is the sentence form with probability `phrasing_variation`, else the bare
answer; `references` lists both, gold first. `check_instruction_answer` accepts either form.
The same config gives the same table (a private `random.Random(seed)`), and no prompt occurs twice.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from warmup_distill_kedro.core.tasks.schema import TaskDataError, build_prompt, make_table

TemplateName = Literal["sort", "largest", "reverse", "count", "upper", "city", "person"]
TEMPLATE_NAMES: tuple[str, ...] = ("sort", "largest", "reverse", "count", "upper", "city", "person")

WORDS: tuple[str, ...] = (
    "red", "blue", "green", "cat", "dog", "sun", "tree", "book", "lamp", "fish", "rain", "milk",
    "bird", "cake", "door", "hat", "moon", "star", "ship", "road", "bell", "leaf", "rock", "frog",
    "coat", "ring", "sand", "wind", "duck", "kite", "pen", "cup",
)  # fmt: skip
CITIES: tuple[str, ...] = (
    "Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Delhi", "Quito", "Berlin", "Madrid",
    "London", "Vienna", "Dublin", "Prague", "Lisbon", "Athens", "Boston", "Sydney", "Seoul", "Toronto",
)  # fmt: skip
PEOPLE: tuple[str, ...] = (
    "Anna", "Ben", "Mia", "Sam", "Lily", "Tom", "Emma", "Leo", "Zoe", "Max",
    "Nora", "Jack", "Ella", "Omar", "Ruth", "Ivan", "Sara", "Paul", "Kate", "Hugo",
)  # fmt: skip
_PLACE_SENTENCES: tuple[str, ...] = (
    "{person} lives in {city}.",
    "{person} flew to {city} last week.",
    "Last summer {person} visited {city}.",
    "{person} moved to {city} in May.",
    "{person} took a train to {city}.",
)

# The sentence form of each template: a fixed prefix, then the answer, then a full stop.
SENTENCE_PREFIXES: dict[str, str] = {
    "sort": "The sorted numbers are",
    "largest": "The largest number is",
    "reverse": "The reversed words are",
    "count": "The number of words is",
    "upper": "The words in upper case are",
    "city": "The city mentioned is",
    "person": "The person mentioned is",
}
_GENERIC_PREFIX = "The answer is"

_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "sort": ("Sort these numbers in ascending order.", "Sort the numbers from smallest to largest."),
    "largest": ("What is the largest number in the list?", "Which number in the list is the largest?"),
    "reverse": ("Reverse the order of these words.", "Write these words in reverse order."),
    "count": ("How many words are in the text?", "Count the words in the text."),
    "upper": ("Write these words in upper case.", "Convert these words to capital letters."),
    "city": ("Which city is mentioned in the text?", "What city does the text mention?"),
    "person": ("Who is mentioned in the text?", "Which person does the text mention?"),
}


class InstructionTaskConfig(BaseModel):
    """Parameters of the procedural instruction task (`params:data.instruction`)."""

    model_config = ConfigDict(extra="forbid")

    n_examples: int = Field(gt=0, le=1_000_000, description="number of distinct examples")
    seed: int = Field(0, description="seed of the generator: same config, same table")
    min_list_length: int = Field(3, ge=2, le=10, description="fewest numbers or words in a list")
    max_list_length: int = Field(5, ge=2, le=10, description="most numbers or words in a list")
    max_number: int = Field(20, ge=2, le=100_000, description="numbers in lists are drawn from 1..max_number")
    templates: list[TemplateName] = Field(default_factory=lambda: list(TEMPLATE_NAMES), min_length=1)
    phrasing_variation: float = Field(
        0.5, ge=0.0, le=1.0, description="probability that the gold response is the sentence form"
    )

    @field_validator("templates")
    @classmethod
    def _unique_templates(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _consistent(self) -> InstructionTaskConfig:
        if self.min_list_length > self.max_list_length:
            raise ValueError(
                f"min_list_length ({self.min_list_length}) must not exceed max_list_length "
                f"({self.max_list_length})"
            )
        if self.max_number < self.max_list_length:
            raise ValueError(
                f"max_number ({self.max_number}) must be at least max_list_length ({self.max_list_length}): "
                f"lists hold distinct numbers"
            )
        return self


# A template: (rng, config) -> (context, bare answer)
Template = Callable[[random.Random, InstructionTaskConfig], tuple[str, str]]


def _numbers(rng: random.Random, config: InstructionTaskConfig) -> list[int]:
    # Distinct numbers: one right order, one largest.
    return rng.sample(
        range(1, config.max_number + 1), rng.randint(config.min_list_length, config.max_list_length)
    )


def _words(rng: random.Random, config: InstructionTaskConfig) -> list[str]:
    return rng.sample(WORDS, rng.randint(config.min_list_length, config.max_list_length))


def _sort(rng: random.Random, config: InstructionTaskConfig) -> tuple[str, str]:
    numbers = _numbers(rng, config)
    return ", ".join(map(str, numbers)), ", ".join(map(str, sorted(numbers)))


def _largest(rng: random.Random, config: InstructionTaskConfig) -> tuple[str, str]:
    numbers = _numbers(rng, config)
    return ", ".join(map(str, numbers)), str(max(numbers))


def _reverse(rng: random.Random, config: InstructionTaskConfig) -> tuple[str, str]:
    words = _words(rng, config)
    return ", ".join(words), ", ".join(reversed(words))


def _count(rng: random.Random, config: InstructionTaskConfig) -> tuple[str, str]:
    words = _words(rng, config)
    return " ".join(words), str(len(words))


def _upper(rng: random.Random, config: InstructionTaskConfig) -> tuple[str, str]:
    words = _words(rng, config)
    return ", ".join(words), ", ".join(word.upper() for word in words)


def _place(rng: random.Random) -> tuple[str, str, str]:
    person, city = rng.choice(PEOPLE), rng.choice(CITIES)
    return rng.choice(_PLACE_SENTENCES).format(person=person, city=city), person, city


def _city(rng: random.Random, config: InstructionTaskConfig) -> tuple[str, str]:
    context, _, city = _place(rng)
    return context, city


def _person(rng: random.Random, config: InstructionTaskConfig) -> tuple[str, str]:
    context, person, _ = _place(rng)
    return context, person


TEMPLATES: dict[str, Template] = {
    "sort": _sort,
    "largest": _largest,
    "reverse": _reverse,
    "count": _count,
    "upper": _upper,
    "city": _city,
    "person": _person,
}


def sentence_form(template: str, answer: str) -> str:
    """The sentence form of a template's answer: `"The largest number is 9."`."""
    return f"{SENTENCE_PREFIXES[template]} {answer}."


# Generation gives up (with an error) when this many draws in a row were infeasible or duplicates.
MAX_MISSES_IN_A_ROW = 2000


def generate_instructions(config: InstructionTaskConfig) -> pd.DataFrame:
    """`config.n_examples` examples with distinct prompts in the common task schema (`schema.COLUMNS`)."""
    rng = random.Random(config.seed)
    width = max(5, len(str(config.n_examples - 1)))
    rows: list[dict] = []
    seen: set[str] = set()
    misses = 0  # draws in a row that gave nothing new
    while len(rows) < config.n_examples:
        if misses >= MAX_MISSES_IN_A_ROW:
            raise TaskDataError(
                f"instruction task: only {len(rows)} distinct prompts found ({misses} draws in a row gave "
                f"nothing new) for n_examples={config.n_examples} with templates "
                f"{config.templates}; lower n_examples, add templates or widen the lists "
                f"(max_list_length, max_number)"
            )
        template = rng.choice(config.templates)
        instruction = rng.choice(_INSTRUCTIONS[template])
        context, answer = TEMPLATES[template](rng, config)
        prompt = build_prompt("instruction", instruction, context)
        if prompt in seen:
            misses += 1
            continue
        seen.add(prompt)
        misses = 0
        sentence = sentence_form(template, answer)
        references = [sentence, answer] if rng.random() < config.phrasing_variation else [answer, sentence]
        rows.append(
            {
                "example_id": f"instruction-{len(rows):0{width}d}",
                "task": "instruction",
                "instruction": instruction,
                "context": context,
                "response": references[0],
                "answer": answer,
                "references": references,
                "prompt": prompt,
            }
        )
    return make_table(rows)


_TOKEN = re.compile(r"[^\W_]+")
_PREFIX_TOKENS: tuple[tuple[str, ...], ...] = tuple(
    tuple(token.lower() for token in _TOKEN.findall(prefix))
    for prefix in (*SENTENCE_PREFIXES.values(), _GENERIC_PREFIX)
)


def _is_upper_case(text: str) -> bool:
    return any(char.isalpha() for char in text) and text == text.upper() and text != text.lower()


def check_instruction_answer(example_answer: str, prediction: str) -> bool:
    """Whether `prediction` gives `example_answer`, bare or in a sentence form.

    Both texts are compared as sequences of words and numbers: whitespace and punctuation do not count,
    nor does case, except that an answer written in upper case ("RED, CAT") must be predicted in upper
    case (it is what the `upper` template checks). The prediction matches when it is the answer, or a
    known sentence prefix ("The largest number is", ..., "The answer is") followed by the answer.
    Anything else, a longer list or an extra word included, does not match.
    """
    answer_tokens = _TOKEN.findall(str(example_answer))
    prediction_tokens = _TOKEN.findall(str(prediction))
    if not answer_tokens:  # an answer of punctuation only: compare the stripped texts
        return " ".join(str(example_answer).split()) == " ".join(str(prediction).split()) != ""
    if not _is_upper_case(str(example_answer)):
        answer_tokens = [token.lower() for token in answer_tokens]
        prediction_tokens = [token.lower() for token in prediction_tokens]
    if prediction_tokens == answer_tokens:
        return True
    lowered = [token.lower() for token in prediction_tokens]
    return any(
        tuple(lowered[: len(prefix)]) == prefix and prediction_tokens[len(prefix) :] == answer_tokens
        for prefix in _PREFIX_TOKENS
    )
