"""Train / validation / test splits with no example and no prompt text in two splits.

Rows are first joined into groups: rows with the same prompt are always one group, and rows that share
a value of the `group_by` column (default: `prompt`) too. Whole groups are then assigned to splits in a
seeded random order, so a split never holds a prompt (or `group_by` value) that another split holds.
The assignment depends on the table's contents and the seed only, not on the order of its rows.
"""

from __future__ import annotations

import random

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from warmup_distill_kedro.core.tasks.schema import TaskDataError

SPLITS: tuple[str, ...] = ("train", "validation", "test")


class SplitConfig(BaseModel):
    """How examples are split (`params:data.split`)."""

    model_config = ConfigDict(extra="forbid")

    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of examples for validation")
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of examples for test")
    seed: int = Field(0, description="seed of the assignment")
    group_by: str = Field(
        "prompt", description="column whose equal values stay in one split (identical prompts always do)"
    )

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitConfig:
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"validation_fraction + test_fraction must be below 1 (got {self.validation_fraction} + "
                f"{self.test_fraction}): something must be left to train on"
            )
        return self


def _groups(df: pd.DataFrame, group_by: str) -> list[list[int]]:
    """Row positions joined by equal prompt or equal `group_by` value (union-find), in a canonical order."""
    parent = list(range(len(df)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for column in dict.fromkeys(["prompt", group_by]):
        first: dict[object, int] = {}
        for position, value in enumerate(df[column].tolist()):
            key = value if isinstance(value, str | int | float) else repr(value)
            if key in first:
                parent[find(position)] = find(first[key])
            else:
                first[key] = position
    members: dict[int, list[int]] = {}
    for position in range(len(df)):
        members.setdefault(find(position), []).append(position)
    prompts = df["prompt"].astype(str).tolist()
    # Sort by contents, not by row order, so that the same examples in another order split the same way.
    return sorted(members.values(), key=lambda rows: min(prompts[r] for r in rows))


def split_examples(
    df: pd.DataFrame,
    validation_fraction: float | SplitConfig = 0.05,
    test_fraction: float | None = None,
    seed: int | None = None,
    group_by: str | None = None,
) -> pd.DataFrame:
    """A copy of `df` with a `split` column in {"train", "validation", "test"}.

    Call it as `split_examples(df, config)` with a `SplitConfig`, or with the fractions, seed and
    `group_by` column directly (explicit arguments override the config's). Each split with a non-zero
    fraction gets at least one group, and train always does; a table with fewer groups than that raises
    `TaskDataError`. Sizes follow the fractions as closely as whole groups allow.
    """
    if isinstance(validation_fraction, SplitConfig):
        base = validation_fraction.model_dump()
    else:
        base = {"validation_fraction": validation_fraction}
    overrides = {
        name: value
        for name, value in (("test_fraction", test_fraction), ("seed", seed), ("group_by", group_by))
        if value is not None
    }
    config = SplitConfig(**(base | overrides))

    missing = [column for column in dict.fromkeys(["prompt", config.group_by]) if column not in df.columns]
    if missing:
        raise TaskDataError(f"split_examples: column {missing[0]!r} is missing")
    groups = _groups(df, config.group_by)
    wanted = [("test", config.test_fraction), ("validation", config.validation_fraction)]
    needed = 1 + sum(fraction > 0 for _, fraction in wanted)
    if len(groups) < needed:
        names = ["train", *(name for name, fraction in wanted[::-1] if fraction > 0)]
        raise TaskDataError(
            f"cannot split {len(df)} examples in {len(groups)} group(s) of identical prompts into "
            f"{', '.join(names)}: each split needs at least one group ({needed} distinct prompts)"
        )
    random.Random(config.seed).shuffle(groups)

    assignment = ["train"] * len(df)
    next_group = 0
    for index, (name, fraction) in enumerate(wanted):
        if fraction == 0:
            continue
        target = max(1, round(fraction * len(df)))
        # Groups that must stay for the splits after this one (the later wanted ones, and train).
        reserved = 1 + sum(later > 0 for _, later in wanted[index + 1 :])
        taken = 0
        while taken < target and len(groups) - next_group > reserved:
            for position in groups[next_group]:
                assignment[position] = name
            taken += len(groups[next_group])
            next_group += 1
    return df.assign(split=assignment)
