"""cli.py: the project's `kedro run` prints a user's error in a few lines, keeps the traceback for bugs, and
says how to write a list in --params."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from kedro.framework.startup import bootstrap_project

from warmup_distill_kedro.cli import run, user_error_message
from warmup_distill_kedro.core.errors import UserInputError


def test_a_bad_parameter_is_printed_in_a_few_lines(project_copy: Path) -> None:
    bootstrap_project(project_copy)
    result = CliRunner().invoke(run, ["--env", "test", "--pipelines", "check", "--params", "check.tau=1.5"])
    assert result.exit_code == 1
    assert "Error: Parameter validation failed" in result.output
    assert "tau must be in (0, 1) for rule 'teacher_prob' (a probability), got 1.5" in result.output
    assert "Traceback" not in result.output and "errors.pydantic.dev" not in result.output
    assert "[type=value_error" not in result.output  # pydantic's echo of the input
    error = result.output[result.output.index("Error:") :]  # what follows the run's log lines
    assert len(error.strip().splitlines()) <= 4
    assert not (project_copy / "data/test").exists()


def test_a_list_written_with_commas_says_how_to_write_it(project_copy: Path) -> None:
    bootstrap_project(project_copy)
    result = CliRunner().invoke(run, ["--env", "test", "--params", "distill.objectives=[fkl,rkl]"])
    assert result.exit_code == 2
    assert "Lists in --params cannot hold commas" in result.output
    assert "--params 'distill.objectives=fkl rkl'" in result.output


def test_only_user_errors_lose_their_traceback() -> None:
    assert user_error_message(UserInputError("data/x.jsonl, line 3: field 'answer' ...")) == (
        "data/x.jsonl, line 3: field 'answer' ..."
    )
    assert user_error_message(RuntimeError("a bug")) is None
    assert user_error_message(KeyError("a bug")) is None
