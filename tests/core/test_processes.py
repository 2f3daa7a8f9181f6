"""core/processes.py with one process, and the launcher's environment read without a process group (the
shared work of several processes is tested on two: tests/core/generation/test_sharded_generation.py)."""

from __future__ import annotations

import pytest

from warmup_distill_kedro.core.processes import (
    gather_in_order,
    is_main_process,
    process_rank_and_count,
    process_share,
)


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_one_process_without_a_launcher(no_launcher):
    assert process_rank_and_count() == (0, 1)
    assert is_main_process()
    assert process_share(5, across_processes=True) == [0, 1, 2, 3, 4]  # one process: all of it
    assert gather_in_order(["a", "b"], across_processes=True) == ["a", "b"]


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"RANK": "1", "WORLD_SIZE": "4"}, (1, 4)),  # torchrun, accelerate
        ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3"}, (2, 3)),  # Open MPI
        ({"PMI_RANK": "0", "PMI_SIZE": "2"}, (0, 2)),
        ({"RANK": "", "PMI_RANK": "3", "WORLD_SIZE": "8"}, (3, 8)),  # an empty variable is no value
    ],
)
def test_the_launchers_environment_names_rank_and_size(no_launcher, variables, expected):
    for name, value in variables.items():
        no_launcher.setenv(name, value)
    assert process_rank_and_count() == expected
    assert is_main_process() == (expected[0] == 0)


def test_without_across_processes_every_process_does_all_of_it(no_launcher):
    no_launcher.setenv("RANK", "1")
    no_launcher.setenv("WORLD_SIZE", "2")
    assert process_share(3, across_processes=False) == [0, 1, 2]
    assert gather_in_order([1, 2, 3], across_processes=False) == [1, 2, 3]


def test_a_missing_result_is_an_error(no_launcher):
    with pytest.raises(RuntimeError, match=r"1 results missing after generation \(first: index 1\)"):
        gather_in_order(["a", None, "c"], across_processes=False)
