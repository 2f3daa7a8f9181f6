"""The project's `kedro run` (Kedro takes `run` from here; `python -m warmup_distill_kedro` too): Kedro's own
command, with the errors a user can fix printed in a few lines.

* A user error (a bad parameter, a missing file or folder, a malformed line: `core.errors.UserInputError`,
  Kedro's parameter validation, the MLflow store's configuration) ends the run with its message and exit
  status 1, without the ~150 lines of traceback through Kedro and click; every other error keeps its
  traceback, since it is a bug to report.
* `--params` splits on commas, so a list cannot be written `[fkl,rkl]` there: a list is written with spaces
  (`distill.objectives="fkl rkl"`, read by grid.name_list), and an item that looks like a cut list says so.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import click
from kedro.framework.cli.project import _split_params
from kedro.framework.cli.project import run as kedro_run

LIST_HINT = (
    "Lists in --params cannot hold commas (Kedro splits --params on them): write the items with spaces, "
    "e.g. --params 'distill.objectives=fkl rkl', or put the list in conf/local/parameters_<stage>.yml"
)
# Pydantic's tail on each error: the input echoed back and a link, noise on a command line.
_PYDANTIC_NOISE = (
    re.compile(r" \[type=\w+, input_value=.*?, input_type=\w+\]"),
    re.compile(r"\n *For further information visit \S+"),
)


def user_error_message(error: BaseException) -> str | None:
    """The message to print for a user error, else None (a bug: let its traceback show)."""
    from kedro.validation.parameter_validator import ParameterValidationError

    from warmup_distill_kedro.core.errors import UserInputError
    from warmup_distill_kedro.hooks.mlflow_tracking import TrackingConfigError, TrackingStoreError

    if not isinstance(
        error, UserInputError | ParameterValidationError | TrackingConfigError | TrackingStoreError
    ):
        return None
    message = str(error)
    for noise in _PYDANTIC_NOISE:
        message = noise.sub("", message)
    return message


def _split_params_with_list_hint(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    try:
        return _split_params(ctx, param, value)
    except click.UsageError as error:
        if isinstance(value, str) and ("[" in value or "]" in value):
            raise click.UsageError(f"{error.message}\n{LIST_HINT}", ctx) from None
        raise


def _run(**kwargs: Any) -> Any:
    try:
        return kedro_run.callback(**kwargs)
    except Exception as error:
        message = user_error_message(error)
        if message is None:
            raise
        raise click.ClickException(message) from None


def _with_list_hint(param: click.Parameter) -> click.Parameter:
    if param.name != "params":
        return param
    param = copy.copy(param)
    param.callback = _split_params_with_list_hint
    param.help = f"{param.help} {LIST_HINT}."
    return param


run = click.Command(
    name="run",
    params=[_with_list_hint(param) for param in kedro_run.params],
    callback=_run,
    help=kedro_run.help,
    short_help=kedro_run.short_help,
)


@click.group(name="warmup-distill")
def cli() -> None:
    """Project commands: `run`, Kedro's, with readable user errors."""


cli.add_command(run)
