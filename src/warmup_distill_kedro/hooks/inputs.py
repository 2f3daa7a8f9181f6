"""Every input a run reads from outside itself is checked before the first node runs.

A run's free inputs (datasets no node of the run produces: a checkpoint folder given by path, the latest
version of an earlier stage's output) are read when their first node starts, which may come after hours
of other work, or after nodes that already replaced unversioned outputs. `InputsCheckHook` asks each one
whether it exists in `before_pipeline_run`, ahead of the other hooks (no MLflow run is opened for a run
that cannot start), and stops the run with every missing input named, and what to change:

* an entry whose catalog `metadata` names the parameter that sets its path (`parameter: teacher_checkpoint`,
  conf/gpu/catalog.yml): that parameter, e.g. `--params teacher_checkpoint=/path/to/folder`;
* a versioned output of an earlier stage: the stage that writes it;
* anything else: its path.

Data files given by parameters (`data.file.path`) are checked with the parameters (core/tasks/sources.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.io import AbstractVersionedDataset

from warmup_distill_kedro.core.errors import UserInputError

logger = logging.getLogger(__name__)

PARAMETER_METADATA_KEY = "parameter"


class MissingInputsError(UserInputError):
    """Inputs of the run that do not exist; the message names each one and what to change."""


def missing_inputs(
    pipeline: Any, catalog: Any, writers: Mapping[str, Iterable[str]] | None = None
) -> list[str]:
    """One line per free input of ``pipeline`` that does not exist in ``catalog``, saying what to do.

    ``writers`` maps a dataset name to the registered pipelines that write it (for the hint)."""
    problems = []
    for name in sorted(pipeline.inputs()):
        if name == "parameters" or name.startswith("params:"):
            continue
        dataset = catalog.get(name)
        if dataset is None or dataset.exists():
            continue  # not in the catalog: Kedro itself refuses the run, naming it
        problems.append(_describe(name, dataset, list((writers or {}).get(name, []))))
    return problems


def _describe(name: str, dataset: Any, writers: list[str]) -> str:
    path = getattr(dataset, "_filepath", None)
    parameter = (getattr(dataset, "metadata", None) or {}).get(PARAMETER_METADATA_KEY)
    if parameter:
        return (
            f"{name}: no such folder or file: {path}; set the parameter '{parameter}', "
            f"e.g. --params {parameter}=/path/to/it (its default is in conf/<env>/globals.yml)"
        )
    versioned = isinstance(dataset, AbstractVersionedDataset)
    missing = f"no saved version under {path}" if versioned else f"no such folder or file: {path}"
    hint = f"; run {' or '.join(f'--pipelines={w}' for w in writers)} first" if writers else ""
    return f"{name}: {missing}{hint}" + (", or pin a version with --load-versions" if versioned else "")


def _writers() -> dict[str, list[str]]:
    """Dataset name -> the registered stage pipelines that write it (compositions left out)."""
    from kedro.framework.project import pipelines

    from warmup_distill_kedro.pipeline_registry import STAGES

    writers: dict[str, list[str]] = {}
    for stage in STAGES:
        pipeline = pipelines.get(stage)
        for output in pipeline.all_outputs() if pipeline is not None else ():
            writers.setdefault(output, []).append(stage)
    return writers


class InputsCheckHook:
    """Stops a run whose external inputs are missing before its first node (and before it is tracked)."""

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        if run_params.get("only_missing_outputs"):
            return  # the runner drops nodes whose outputs exist: their inputs may rightly be absent
        problems = missing_inputs(pipeline, catalog, _writers())
        if problems:
            raise MissingInputsError(
                f"{len(problems)} input(s) of this run do not exist; nothing was run:\n  "
                + "\n  ".join(problems)
            )
