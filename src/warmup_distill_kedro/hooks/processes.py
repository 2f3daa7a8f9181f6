"""`kedro run` on several processes (`accelerate launch ... -m kedro run`, docs/scaling.md).

Every process runs the whole pipeline: each training node trains data-parallel (core/training/loop.py), and
every other node runs on every process too. Kedro stays in charge of the catalog, but only the main
process writes:

* `ProcessLocalDataset`: on the other processes, each dataset of the pipeline is wrapped so that a save
  keeps the data in memory for the downstream nodes of that process's own run, and a load returns it;
  a dataset the run does not produce is read from disk as usual (it existed before the run). No process
  ever reads a version the main process is writing.
* `MainProcessWritesHook` installs the wrappers in `before_pipeline_run`, when the pipeline is known:
  `after_catalog_created` is too early, datasets matched by catalog patterns (`{role}_model`) do not
  exist yet then.
* MLflow (mlflow_tracking.py) tracks from the main process only; the training state (training_state.py) has one folder,
  chosen by the main process, written by it alone.

The process index and count come from core.processes (the launcher's environment until the process
group exists, so the hooks need none); `broadcast_from_main` joins the group when it first needs to talk
to the other processes.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.io import AbstractDataset, DatasetError, MemoryDataset

from warmup_distill_kedro.core.processes import (
    join_launched_processes,
    process_rank_and_count,
)

logger = logging.getLogger(__name__)


def broadcast_from_main(value: Any) -> Any:
    """The main process's `value` on every process (a collective: every process must call it)."""
    if process_rank_and_count()[1] == 1:
        return value
    from accelerate.utils import broadcast_object_list

    join_launched_processes()
    return broadcast_object_list([value])[0]


_NOTHING = object()


class ProcessLocalDataset(AbstractDataset):
    """A dataset as a process other than the main one sees it: what the run saves stays in memory.

    `load` returns what this process saved in this run (tables copied, other objects as they are: a
    model is not duplicated), else what the wrapped dataset reads from disk (data that existed before
    the run). After `release` a saved dataset cannot be loaded again: its data was this process's only.
    """

    def __init__(self, dataset: AbstractDataset, name: str):
        self._dataset = dataset
        self._name = name
        self._data: Any = _NOTHING
        self._saved = False

    @property
    def wrapped(self) -> AbstractDataset:
        return self._dataset

    def load(self) -> Any:
        if not self._saved:
            return self._dataset.load()
        if self._data is _NOTHING:
            raise DatasetError(
                f"{self._name}: process {process_rank_and_count()[0]} kept this output in memory and it was released"
            )
        return _copy(self._data)

    def save(self, data: Any) -> None:
        self._data = _copy(data)
        self._saved = True

    def _exists(self) -> bool:
        return self._saved or self._dataset.exists()

    def _release(self) -> None:
        self._data = _NOTHING

    def _describe(self) -> dict[str, Any]:
        return {"dataset": repr(self._dataset), "process": process_rank_and_count()[0], "saved": self._saved}


def _copy(data: Any) -> Any:
    """Tables are copied (nodes may change them in place); anything else is handed on as it is."""
    if hasattr(data, "copy") and type(data).__module__.split(".")[0] in ("pandas", "numpy"):
        return data.copy()
    return data


@contextmanager
def _quiet(logger_name: str):
    """Silence a logger (the catalog warns once per replaced dataset)."""
    target = logging.getLogger(logger_name)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


def keep_outputs_in_memory(catalog: Any, dataset_names: set[str] | list[str]) -> list[str]:
    """Wrap each named dataset of `catalog` in a `ProcessLocalDataset`; returns the names wrapped.

    Parameters and memory datasets are left alone (nothing reaches the disk through them), as are the
    names the catalog does not know (the runner gives those a `MemoryDataset`).
    """
    wrapped = []
    with _quiet("kedro.io.data_catalog"):
        for name in sorted(dataset_names):
            if name == "parameters" or name.startswith("params:"):
                continue
            dataset = catalog.get(name)  # also materialises a dataset matched by a pattern
            if dataset is None or isinstance(dataset, MemoryDataset | ProcessLocalDataset):
                continue
            catalog[name] = ProcessLocalDataset(dataset, name)
            wrapped.append(name)
    return wrapped


class MainProcessWritesHook:
    """Under a launcher with several processes, only the main process writes the catalog's datasets."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        rank, world = process_rank_and_count()
        if world == 1:
            return
        if rank == 0:
            logger.info(
                "kedro run on %d processes: this main process writes the catalog and tracks the run", world
            )
            return
        wrapped = keep_outputs_in_memory(catalog, pipeline.datasets())
        logger.info(
            "process %d of %d: %d datasets kept in memory, written by the main process only",
            rank,
            world,
            len(wrapped),
        )

    @hook_impl
    def after_pipeline_run(self) -> None:
        _leave_process_group()

    @hook_impl
    def on_pipeline_error(self) -> None:
        _leave_process_group()


def _leave_process_group() -> None:
    """Close the process group at the end of the run: a process that exits with it open may abort in the
    backend's teardown (seen once with gloo: "terminate called without an active exception")."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
