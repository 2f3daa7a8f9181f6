"""What the project's hooks set around a training node: where its runs save their resumable state, and
where their per-step metrics go. Context variables, so that the core needs no Kedro and nodes no extra
argument; without a hook (a script, a test) runs save no state and report metrics nowhere.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from pathlib import Path

MetricsSink = Callable[[Mapping[str, float], int], None]

STATE_FILE = "state.pt"
_STATE_FOLDER: ContextVar[Path | None] = ContextVar("training_state_folder", default=None)
_METRICS_SINK: ContextVar[MetricsSink | None] = ContextVar("training_metrics_sink", default=None)


def set_state_folder(folder: str | Path | None) -> None:
    """The folder under which `TrainingRun`s save and resume their state (None: nowhere)."""
    _STATE_FOLDER.set(Path(folder) if folder is not None else None)


def current_state_folder() -> Path | None:
    """The folder set by `set_state_folder` in this context (None: runs save no state)."""
    return _STATE_FOLDER.get()


def set_metrics_sink(sink: MetricsSink | None) -> None:
    """Where `TrainingRun`s that were given no sink report their metrics: `sink(metrics, step)`."""
    _METRICS_SINK.set(sink)


def current_metrics_sink() -> MetricsSink | None:
    return _METRICS_SINK.get()


def slug(name: str) -> str:
    """A run name as a folder name."""
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "train"
