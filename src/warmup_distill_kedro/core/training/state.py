"""What makes a training run resumable besides the model and optimizer: where its state is saved, and
the random number generators, saved and restored as one."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
# Where runs save their resumable state when none is passed: set around a node by the project's
# TrainingStateHook (a context variable, so the core needs no Kedro and nodes need no extra argument).
_STATE_FOLDER: ContextVar[Path | None] = ContextVar("training_state_folder", default=None)


def set_state_folder(folder: str | Path | None) -> None:
    """The folder under which `TrainingRun`s save and resume their state (None: nowhere)."""
    _STATE_FOLDER.set(Path(folder) if folder is not None else None)


def current_state_folder() -> Path | None:
    """The folder set by `set_state_folder` in this context (None: runs save no state)."""
    return _STATE_FOLDER.get()


def slug(name: str) -> str:
    """A run name as a folder name."""
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "train"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
