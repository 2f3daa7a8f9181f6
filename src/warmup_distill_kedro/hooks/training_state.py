"""Resume a training node after a crash: rerun the same `kedro run` and it continues where it stopped.

`TrainingStateHook` gives every node tagged `training` a state folder,
`<data_root>/09_training_state/<node>/<code>-<inputs>/` (`data_root`: the environment's, in
`conf/<env>/globals.yml`), through `core.training.set_state_folder`; the training
loop saves its whole state there every `training.checkpoint_every` steps and resumes from it when it
finds one. The folder's name is a fingerprint of what the node computes with: `<code>` the package's
version and source files (`code_fingerprint`), `<inputs>` its parameters and the content of its inputs
(`input_fingerprint`). So a rerun after a crash resumes, while a run with other parameters, other data
or other code (a fix to a loss or to the loop) starts over, and says so. States written by other code
can never be resumed by this code: they are deleted when the node starts; states of other inputs are
listed and kept (rerunning with those inputs resumes them). When the node's outputs are saved, its state
is deleted; after a crash it stays for the next run. Under several processes (docs/scaling.md) the
folder is the main process's, and only the main process writes and deletes it; every process resumes
from it.

Content, not catalog versions: a rerun regenerates upstream outputs under new version timestamps, but
with fixed seeds their content is the same.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.framework.hooks import hook_impl
from pydantic import BaseModel

import warmup_distill_kedro
from warmup_distill_kedro.core.models.modeling import Checkpoint, weights_digest
from warmup_distill_kedro.core.models.tokenization import vocabulary_fingerprint
from warmup_distill_kedro.core.processes import is_main_process
from warmup_distill_kedro.core.training.context import set_state_folder
from warmup_distill_kedro.hooks.mlflow_tracking import TRAINING_TAG
from warmup_distill_kedro.hooks.processes import broadcast_from_main

logger = logging.getLogger(__name__)

STATE_FOLDER = "09_training_state"
_SAMPLES_PER_TENSOR = 4096


# A state folder's name: <code fingerprint>-<inputs fingerprint> (older versions: the inputs' alone).
_STATE_NAME = re.compile(r"^(?:(?P<code>[0-9a-f]+)-)?(?P<inputs>[0-9a-f]+)$")


def code_fingerprint(package: Path | None = None) -> str:
    """A short hash of the code that trains: the package's version and every source file of the package
    (`package`: its folder; default, the one imported, read once). Not the git commit: an installed copy
    has no history, and uncommitted edits count."""
    if package is None:
        return _imported_code_fingerprint()
    digest = hashlib.sha256(warmup_distill_kedro.__version__.encode())
    for source in sorted(Path(package).rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode())
        digest.update(hashlib.sha256(source.read_bytes()).digest())
    return digest.hexdigest()[:12]


@functools.cache
def _imported_code_fingerprint() -> str:
    return code_fingerprint(Path(warmup_distill_kedro.__file__).parent)


def state_folder_name(inputs: Mapping[str, Any]) -> str:
    """The name of a node's state folder: the fingerprint of the code and of the node's inputs."""
    return f"{code_fingerprint()}-{input_fingerprint(inputs)}"


def input_fingerprint(inputs: Mapping[str, Any]) -> str:
    """A short hash of a node's inputs by content: parameters, tables, checkpoints, tokenizers."""
    digest = hashlib.sha256()
    for name in sorted(inputs):
        digest.update(name.encode())
        digest.update(_content_digest(inputs[name]).encode())
    return digest.hexdigest()[:16]


def _content_digest(value: Any) -> str:
    if isinstance(value, Checkpoint):
        return vocabulary_fingerprint(value.tokenizer) + weights_digest(value.model)
    if isinstance(value, pd.DataFrame):
        try:
            hashed = pd.util.hash_pandas_object(value, index=True)
        except TypeError:  # list-valued columns (token ids, references) are not hashable as they are
            hashed = pd.util.hash_pandas_object(value.astype(str), index=True)
        return hashlib.sha256(hashed.to_numpy().tobytes() + str(list(value.columns)).encode()).hexdigest()
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    if hasattr(value, "get_vocab"):  # a tokenizer
        return vocabulary_fingerprint(value)
    return json.dumps(value, sort_keys=True, default=str)


class TrainingStateHook:
    """Sets the state folder of each training node, and deletes it once the node's outputs are saved."""

    def __init__(self) -> None:
        self._root: Path | None = None
        self._unsaved: dict[str, tuple[Path, set[str]]] = {}  # node -> (its state folder, outputs to save)

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        # Each environment writes under its own data root (conf/<env>/globals.yml): a test run never
        # resumes, or deletes, the state of a demo run.
        data_root = context.config_loader["globals"].get("data_root", "data")
        self._root = Path(context.project_path) / data_root / STATE_FOLDER

    @hook_impl
    def before_node_run(self, node: Any, inputs: dict[str, Any]) -> None:
        if self._root is None or TRAINING_TAG not in node.tags:
            return
        folder = self._root / node.name / state_folder_name(inputs)
        # Several processes: the main one's folder for all (another process's inputs may come from memory,
        # where a table's column types can differ from what the main process read back from parquet).
        folder = Path(broadcast_from_main(str(folder)))
        if is_main_process():
            _tidy_other_states(node.name, folder)
        if folder.exists():
            logger.info("%s: found training state from an interrupted run in %s", node.name, folder)
        set_state_folder(folder)
        self._unsaved[node.name] = (folder, set(node.outputs))

    @hook_impl
    def after_node_run(self, node: Any) -> None:
        set_state_folder(None)

    @hook_impl
    def on_node_error(self, node: Any) -> None:
        set_state_folder(None)
        self._unsaved.pop(node.name, None)  # keep the state: the next run resumes from it

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, node: Any) -> None:
        entry = self._unsaved.get(node.name)
        if entry is None:
            return
        folder, outputs = entry
        outputs.discard(dataset_name)
        if not outputs:  # every output is safely saved: the state is no longer needed
            del self._unsaved[node.name]
            if not is_main_process():  # its "saves" are in memory; the main process's decide
                return
            shutil.rmtree(folder, ignore_errors=True)
            for empty in (folder.parent, folder.parent.parent):  # <node>/, then the state root
                if empty.is_dir() and not any(empty.iterdir()):
                    empty.rmdir()


def _tidy_other_states(node_name: str, folder: Path) -> None:
    """The node's other state folders: those of other code are deleted (this code can never resume them),
    those of other inputs are kept; when this run starts over, the log says why."""
    if not folder.parent.is_dir():
        return
    code = folder.name.split("-", 1)[0]
    other_inputs = []
    for other in sorted(p for p in folder.parent.iterdir() if p.is_dir() and p != folder):
        name = _STATE_NAME.match(other.name)
        if name is None:  # not a state folder of ours: leave it alone
            continue
        if name["code"] != code:
            shutil.rmtree(other, ignore_errors=True)
            logger.warning(
                "%s: not resuming the training state in %s: it was written by other code (the package's "
                "version or source changed since); deleted, this code can never resume it",
                node_name,
                other,
            )
        else:
            other_inputs.append(other.name)
    if other_inputs and not folder.exists():
        logger.warning(
            "%s: not resuming the training state(s) %s in %s: their inputs or parameters differ from this "
            "run's; starting over (they are kept for a run with those inputs; delete them if none will come)",
            node_name,
            ", ".join(other_inputs),
            folder.parent,
        )
