"""grid.py: the distill grid's cells, the subjects the evaluate pipeline measures, the names refused, and the
grid's parameters as the pipelines read them."""

from __future__ import annotations

import pytest

from warmup_distill_kedro import grid
from warmup_distill_kedro.core.errors import UserInputError
from warmup_distill_kedro.grid import Cell, Subject


def test_cells_list_variants_outermost_in_the_order_given():
    cells = grid.cells({"variants": ["warmup", "vanilla"], "objectives": ["js", "fkl"]})
    assert [cell.name for cell in cells] == ["warmup.js", "warmup.fkl", "vanilla.js", "vanilla.fkl"]
    assert cells[0] == Cell("warmup", "js")
    assert grid.variants_of(cells) == ["warmup", "vanilla"]


def test_the_defaults_without_parameters():
    cells = grid.cells({})
    assert len(cells) == len(grid.DEFAULT_VARIANTS) * len(grid.DEFAULT_OBJECTIVES) == 16
    assert grid.variants_of(cells) == ["vanilla", "warmup"]
    assert [cell.objective for cell in cells[:8]] == list(grid.DEFAULT_OBJECTIVES)


def test_a_single_name_is_a_one_name_list():
    assert grid.cells({"variants": "control", "objectives": "sft"}) == [Cell("control", "sft")]


def test_the_grid_reads_the_parameters_it_was_given(use_grid):
    use_grid(["control"], ["dskd"])
    assert grid.cells() == [Cell("control", "dskd")]
    assert not grid.use_parameters({"variants": ["control"], "objectives": ["dskd"]})  # unchanged
    assert grid.use_parameters({})  # back to the defaults: a change
    assert len(grid.cells()) == 16


def test_a_cell_starts_from_its_variants_checkpoint_and_trains_on_its_objectives_examples():
    assert Cell("vanilla", "fkl").start == "student_model"
    assert Cell("warmup", "fkl").start == "student_warmup"
    assert Cell("control", "fkl").start == "student_control"
    assert Cell("warmup", "fkl").examples == "kd_examples"
    assert Cell("warmup", "dskd_cma").examples == "kd_examples"
    assert Cell("vanilla", "sft").examples == "sft_examples"  # the baseline: the student's gold examples
    assert Cell("control", "akl").name == "control.akl"


def test_subjects_are_the_teacher_each_student_before_kd_and_each_cell():
    subjects = grid.subjects(grid.cells({"variants": ["vanilla"], "objectives": ["fkl", "rkl"]}))
    assert subjects == [
        Subject("teacher", "teacher", "teacher_model"),
        Subject("vanilla", "before_kd", "student_model"),
        Subject("vanilla", "fkl", "vanilla.fkl.student"),
        Subject("vanilla", "rkl", "vanilla.rkl.student"),
    ]
    assert [s.name for s in subjects] == ["teacher", "vanilla.before_kd", "vanilla.fkl", "vanilla.rkl"]


def test_the_control_student_is_measured_whenever_warmup_is_in_the_grid():
    subjects = grid.subjects(grid.cells({"variants": ["warmup"], "objectives": ["fkl"]}))
    assert [s.name for s in subjects] == ["teacher", "warmup.before_kd", "control.before_kd", "warmup.fkl"]
    assert subjects[2].checkpoint == "student_control"
    both = grid.subjects(grid.cells({"variants": ["vanilla", "warmup"], "objectives": ["fkl"]}))
    assert [s.name for s in both if s.objective == grid.BEFORE_KD] == [
        "vanilla.before_kd",
        "warmup.before_kd",
        "control.before_kd",
    ]
    # ...once, when control is a variant of the grid too; and not at all without warmup.
    with_control = grid.cells({"variants": ["control", "warmup"], "objectives": ["fkl"]})
    assert grid.starting_variants(with_control) == ["control", "warmup"]
    assert grid.starting_variants(grid.cells({"variants": ["vanilla"], "objectives": ["fkl"]})) == ["vanilla"]


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"variants": ["vanilla", "distilled"]}, r"distill\.variants: unknown \['distilled'\]; choose from"),
        ({"objectives": ["fkl", "kl2"]}, r"distill\.objectives: unknown \['kl2'\]; choose from \['fkl'"),
        ({"objectives": []}, r"distill\.objectives must be a non-empty list of names .*, got \[\]"),
        ({"variants": [1]}, r"distill\.variants must be a non-empty list of names"),
        ({"objectives": ["fkl", "fkl"]}, r"distill\.objectives lists a name twice: \['fkl', 'fkl'\]"),
    ],
)
def test_a_bad_name_is_refused_naming_the_parameter(parameters, message):
    with pytest.raises(ValueError, match=message):
        grid.cells(parameters)


def test_names_separated_by_spaces_are_a_list_as_on_the_command_line():
    """`--params 'distill.objectives=fkl js'` (Kedro splits --params on commas, so no [fkl,js] there)."""
    cells = grid.cells({"variants": "warmup", "objectives": "fkl  js"})
    assert [cell.name for cell in cells] == ["warmup.fkl", "warmup.js"]
    with pytest.raises(UserInputError, match=r"distill\.objectives: unknown \['kl2'\]"):
        grid.cells({"objectives": "fkl kl2"})


def test_several_training_seeds_make_one_named_run_per_seed_inside_each_cell():
    runs = grid.cells({"variants": ["vanilla"], "objectives": ["fkl", "sft"], "seeds": "0 2"})
    assert [c.name for c in runs] == [
        "vanilla.fkl.seed0",
        "vanilla.fkl.seed2",
        "vanilla.sft.seed0",
        "vanilla.sft.seed2",
    ]
    assert [c.seed for c in runs] == [0, 2, 0, 2]
    subjects = grid.subjects(runs)
    assert [(s.name, s.seed) for s in subjects[-4:]] == [(c.name, c.seed) for c in runs]
    assert subjects[-1].checkpoint == "vanilla.sft.seed2.student"
    assert [c.name for c in grid.first_seed(runs)] == ["vanilla.fkl.seed0", "vanilla.sft.seed0"]


def test_one_seed_keeps_the_plain_names_and_trains_with_that_seed():
    [run] = grid.cells({"variants": ["warmup"], "objectives": ["fkl"], "seeds": [3]})
    assert (run.name, run.seed) == ("warmup.fkl", 3)
    [legacy] = grid.cells({"variants": ["warmup"], "objectives": ["fkl"], "training": {"seed": 5}})
    assert (legacy.name, legacy.seed) == ("warmup.fkl", 5)


@pytest.mark.parametrize(
    ("seeds", "message"),
    [([], "non-empty list"), ("a b", "non-empty list"), ([1, 1], "a seed twice"), ([-1], "integers >= 0"),
     ([True], "non-empty list"), ([1.5], "non-empty list")],
)  # fmt: skip
def test_bad_seeds_are_refused_naming_the_parameter(seeds, message):
    with pytest.raises(
        UserInputError, match=f"distill.seeds.*{message}|{message}.*distill.seeds|distill.seeds"
    ):
        grid.cells({"objectives": ["fkl"], "seeds": seeds})
