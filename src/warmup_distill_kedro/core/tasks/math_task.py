"""Seeded, procedural GSM8K-style word problems with worked answers.

A problem starts with a quantity and applies 1-5 steps (`+`, `-`, `*`):

    Question: Tom has 5 apples. He buys 7 more. Then he gives away 3. How many apples does Tom have now?
    Answer: 5 + 7 = 12. 12 - 3 = 9. #### 9

Several answers are valid for one problem: the operands of a commutative step (`+`, `*`) may be written
in either order (`7 + 5 = 12`). The gold response swaps each such step with probability
`step_order_variation`; `references` lists the gold response first and then the other orders (at most
`max_references` in all). Every reference ends in the same `#### N`. A teacher trained on all references
spreads its probability over the orders, which is knowledge the gold data alone does not carry.

Every result stays within [0, max_result] and only the final one may be 0: nobody gives away more than
they have.
The same config gives the same table (a private `random.Random(seed)`), and no question occurs twice.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from warmup_distill_kedro.core.tasks.schema import TaskDataError, build_prompt, make_table

Operation = Literal["+", "-", "*"]
COMMUTATIVE: frozenset[str] = frozenset({"+", "*"})

# (name, subject pronoun, object pronoun, possessive)
_PEOPLE: tuple[tuple[str, str, str, str], ...] = (
    ("Tom", "he", "him", "his"),
    ("Anna", "she", "her", "her"),
    ("Ben", "he", "him", "his"),
    ("Mia", "she", "her", "her"),
    ("Sam", "he", "him", "his"),
    ("Lily", "she", "her", "her"),
    ("Max", "he", "him", "his"),
    ("Emma", "she", "her", "her"),
    ("Leo", "he", "him", "his"),
    ("Zoe", "she", "her", "her"),
    ("Jack", "he", "him", "his"),
    ("Nora", "she", "her", "her"),
)
_OBJECTS: tuple[str, ...] = (
    "apples", "pencils", "stickers", "marbles", "books", "cookies",
    "cards", "shells", "stamps", "coins", "balloons", "toys",
)  # fmt: skip

_START = (
    "{Name} has {a} {obj}.",
    "{Name} owns {a} {obj}.",
    "{Name} starts with {a} {obj}.",
    "{Name} keeps {a} {obj} in a box.",
)
_STEP: dict[str, tuple[str, ...]] = {
    "+": (
        "{he} buys {b} more.",
        "{he} finds {b} more.",
        "{he} gets {b} more.",
        "{Friend} gives {him} {b} more.",
    ),
    "-": (
        "{he} gives away {b}.",
        "{he} loses {b}.",
        "{he} sells {b}.",
        "{he} gives {b} to {Friend}.",
    ),
    "*": (
        "{he} multiplies {his} {obj} by {b}.",
        "{his} {obj} grow to {b} times as many.",
    ),
}
_DOUBLE_TRIPLE = {2: "{he} doubles {his} {obj}.", 3: "{he} triples {his} {obj}."}
_CONNECTORS = ("", "", "Then ", "Next, ")
_QUESTION = (
    "How many {obj} does {Name} have now?",
    "How many {obj} does {Name} have in the end?",
    "How many {obj} does {he} have now?",
)
_QUESTION_AFTER_MINUS = "How many {obj} does {Name} have left?"


class MathTaskConfig(BaseModel):
    """Parameters of the procedural math task (`params:data.math`)."""

    model_config = ConfigDict(extra="forbid")

    n_examples: int = Field(gt=0, le=1_000_000, description="number of distinct problems")
    seed: int = Field(0, description="seed of the generator: same config, same table")
    max_number: int = Field(20, ge=2, le=100_000, description="largest starting quantity and step operand")
    max_result: int | None = Field(
        None, description="largest intermediate or final result; null means 2 * max_number"
    )
    min_steps: int = Field(2, ge=1, le=5, description="fewest operations per problem")
    max_steps: int = Field(3, ge=1, le=5, description="most operations per problem")
    operations: list[Operation] = Field(default_factory=lambda: ["+", "-"], min_length=1)
    max_multiplier: int = Field(3, ge=2, le=10, description="largest factor of a `*` step")
    step_order_variation: float = Field(
        0.5, ge=0.0, le=1.0, description="probability that the gold response swaps a commutative step"
    )
    max_references: int = Field(8, ge=1, le=64, description="most valid responses listed per problem")

    @field_validator("operations")
    @classmethod
    def _unique_operations(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _consistent(self) -> MathTaskConfig:
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must not exceed max_steps ({self.max_steps})")
        if self.max_result is not None and self.max_result < self.max_number:
            raise ValueError(
                f"max_result ({self.max_result}) must be at least max_number ({self.max_number})"
            )
        return self

    @property
    def result_limit(self) -> int:
        return self.max_result if self.max_result is not None else 2 * self.max_number


@dataclass(frozen=True)
class Step:
    left: int
    op: str
    right: int

    @property
    def result(self) -> int:
        if self.op == "+":
            return self.left + self.right
        if self.op == "-":
            return self.left - self.right
        return self.left * self.right

    def render(self, swapped: bool) -> str:
        left, right = (
            (self.right, self.left) if swapped and self.op in COMMUTATIVE else (self.left, self.right)
        )
        return f"{left} {self.op} {right} = {self.result}."


def render_response(steps: list[Step], swaps: tuple[bool, ...]) -> str:
    """`"5 + 7 = 12. 12 - 3 = 9. #### 9"` for the given operand order of each step."""
    lines = [step.render(swap) for step, swap in zip(steps, swaps, strict=True)]
    return " ".join(lines) + f" #### {steps[-1].result}"


def response_variants(steps: list[Step], gold_swaps: tuple[bool, ...], limit: int) -> list[str]:
    """The gold response, then every other operand order of the commutative steps, deduplicated, capped."""
    variants = [render_response(steps, gold_swaps)]
    choices = [(False, True) if step.op in COMMUTATIVE else (False,) for step in steps]
    for swaps in itertools.product(*choices):
        if len(variants) >= limit:
            break
        text = render_response(steps, swaps)
        if text not in variants:  # `3 + 3` reads the same both ways
            variants.append(text)
    return variants


def _choose_step(rng: random.Random, current: int, last: bool, config: MathTaskConfig) -> Step | None:
    """One feasible step from `current`; only the last step may reach 0 ("how many are left?")."""
    limit = config.result_limit
    lowest = 0 if last else 1
    feasible = []
    for op in config.operations:
        if (
            (op == "+" and current + 1 <= limit)
            or (op == "-" and current - 1 >= lowest)
            or (op == "*" and current >= 1 and current * 2 <= limit)
        ):
            feasible.append(op)
    if not feasible:
        return None
    op = rng.choice(feasible)
    if op == "+":
        operand = rng.randint(1, min(config.max_number, limit - current))
    elif op == "-":
        operand = rng.randint(1, min(config.max_number, current - lowest))
    else:
        operand = rng.randint(2, min(config.max_multiplier, limit // current))
    return Step(current, op, operand)


def _question(rng: random.Random, start: int, steps: list[Step]) -> str:
    name, he, him, his = rng.choice(_PEOPLE)
    friend = rng.choice([person[0] for person in _PEOPLE if person[0] != name])
    obj = rng.choice(_OBJECTS)
    words = {"Name": name, "he": he, "him": him, "his": his, "obj": obj, "Friend": friend}
    sentences = [rng.choice(_START).format(a=start, **words)]
    for index, step in enumerate(steps):
        templates = _STEP[step.op]
        if step.op == "*" and step.right in _DOUBLE_TRIPLE:
            templates = (*templates, _DOUBLE_TRIPLE[step.right])
        sentence = rng.choice(templates).format(b=step.right, **words)
        connector = rng.choice(_CONNECTORS) if index > 0 else ""
        sentence = connector + sentence if connector else sentence[0].upper() + sentence[1:]
        sentences.append(sentence)
    questions = (*_QUESTION, _QUESTION_AFTER_MINUS) if steps[-1].op == "-" else _QUESTION
    sentences.append(rng.choice(questions).format(**words))
    return " ".join(sentences)


def _problem(rng: random.Random, config: MathTaskConfig) -> tuple[int, list[Step]] | None:
    start = rng.randint(2, config.max_number)  # "has 1 apples" reads badly
    n_steps = rng.randint(config.min_steps, config.max_steps)
    steps: list[Step] = []
    current = start
    for index in range(n_steps):
        step = _choose_step(rng, current, index == n_steps - 1, config)
        if step is None:
            return None
        steps.append(step)
        current = step.result
    return start, steps


# Generation gives up (with an error) when this many draws in a row were infeasible or duplicates.
MAX_MISSES_IN_A_ROW = 2000


def generate_math(config: MathTaskConfig) -> pd.DataFrame:
    """`config.n_examples` distinct word problems in the common task schema (`schema.COLUMNS`)."""
    rng = random.Random(config.seed)
    width = max(5, len(str(config.n_examples - 1)))
    rows: list[dict] = []
    seen: set[str] = set()
    misses = 0  # draws in a row that gave nothing new
    while len(rows) < config.n_examples:
        if misses >= MAX_MISSES_IN_A_ROW:
            raise TaskDataError(
                f"math task: only {len(rows)} distinct problems found ({misses} draws in a row gave nothing "
                f"new) for n_examples={config.n_examples}; lower n_examples or widen the space (max_number, "
                f"max_steps, operations)"
            )
        problem = _problem(rng, config)
        if problem is None:
            misses += 1
            continue
        start, steps = problem
        question = _question(rng, start, steps)
        if question in seen:
            misses += 1
            continue
        seen.add(question)
        misses = 0
        gold_swaps = tuple(
            step.op in COMMUTATIVE and rng.random() < config.step_order_variation for step in steps
        )
        references = response_variants(steps, gold_swaps, config.max_references)
        rows.append(
            {
                "example_id": f"math-{len(rows):0{width}d}",
                "task": "math",
                "instruction": question,
                "context": "",
                "response": references[0],
                "answer": str(steps[-1].result),
                "references": references,
                "prompt": build_prompt("math", question),
            }
        )
    return make_table(rows)
