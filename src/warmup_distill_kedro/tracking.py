"""MLflow helpers shared by the project hook and by node code (no Kedro import here).

* ``TrackingConfig``: the ``mlflow:`` block of ``conf/*/mlflow*.yml``.
* ``default_tracking_uri`` / ``default_artifact_location`` / ``resolve_tracking_uri`` /
  ``resolve_artifact_location``: where the store and the artifacts live, as absolute URIs.
* ``flatten_params``: nested parameters -> ``{"a.b": "value"}`` that MLflow accepts.
* ``config_fingerprint``: which runs share a configuration (every parameter but the seeds), the
  ``config`` tag of each run and what ``kedro compare`` groups by.
* ``runs_page_url``: where the MLflow UI shows the experiment's training runs.
* ``log_step_metrics``: per-step metrics from inside a node (a training loop); they go to the MLflow
  run that is active in the calling thread (the node's child run, see ``hooks/mlflow_tracking.py``), or nowhere.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import numbers
import os
import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT_NAME = "warmup-distill"
# The tags every run of a `kedro run` carries (the parent and its children), to tell configurations apart.
ENV_TAG = "kedro.env"
CONFIG_TAG = "config"
SEED_TAG = "seed"
# The seeds `kedro compare` pools over: runs of one configuration that differ in them are repetitions.
# `distill.seeds` lists a run's training seeds (each cell's training run is tagged with its own);
# `distill.training.seed` is the seed of a run that does not set them.
SEED_PARAM = "distill.training.seed"
SEEDS_PARAM = "distill.seeds"
# An evaluated run's test-item scores (the evaluation JSON's `items`), logged beside its metrics so that
# `kedro compare` gives its differences the report's paired intervals.
ITEMS_ARTIFACT = "evaluation_items.json"
DB_FILENAME = "mlflow.db"
ARTIFACTS_DIRNAME = "mlruns"

# MLflow's limits (mlflow/utils/validation.py in 3.17: MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH,
# MAX_ENTITY_KEY_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_METRICS_PER_BATCH).
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
TRUNCATION_MARKER = "...[truncated]"

_INVALID_KEY_CHARS = re.compile(r"[^/\w.\- ]")


class TrackingConfig(BaseModel):
    """The ``mlflow:`` block of ``conf/<env>/mlflow.yml``."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # None -> sqlite:///<project root>/mlflow.db. A relative sqlite path or plain path is taken relative to
    # the project root; any other URI (http://..., postgresql://...) is used as given.
    tracking_uri: str | None = None
    # None -> file://<project root>/mlruns. Only used when the experiment is created.
    artifact_location: str | None = None
    experiment_name: str = DEFAULT_EXPERIMENT_NAME
    # What a run does when the store cannot be opened or written at start: stop before any node runs, or
    # say so and run untracked. Either way nothing is half-logged.
    on_store_error: Literal["stop", "continue_untracked"] = "stop"


# --------------------------------------------------------------------------------------------- locations
def default_tracking_uri(project_path: str | Path) -> str:
    """``sqlite:///`` + the absolute path of ``<project_path>/mlflow.db``."""
    return "sqlite:///" + (Path(project_path).expanduser().resolve() / DB_FILENAME).as_posix()


def default_artifact_location(project_path: str | Path) -> str:
    """``file://`` URI of ``<project_path>/mlruns``."""
    return (Path(project_path).expanduser().resolve() / ARTIFACTS_DIRNAME).as_uri()


def _has_scheme(uri: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", uri) is not None


def resolve_tracking_uri(uri: str | None, project_path: str | Path) -> str:
    """Make a configured tracking URI absolute with respect to the project root.

    ``None`` -> ``$MLFLOW_TRACKING_URI`` when set (MLflow's own convention), else the default sqlite
    store; ``sqlite:///rel/path.db`` -> ``sqlite:////<root>/rel/path.db``;
    a plain path (``mlruns``) -> a ``file://`` URI; every other URI is returned unchanged.
    """
    root = Path(project_path).expanduser().resolve()
    if uri is None or not str(uri).strip():
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.strip():
        return default_tracking_uri(root)
    uri = str(uri).strip()
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///") :]
        path_part, sep, query = rest.partition("?")
        if not path_part or path_part.startswith("/") or path_part == ":memory:":
            return uri
        return f"sqlite:///{(root / path_part).resolve().as_posix()}{sep}{query}"
    if uri.startswith("file:") and not uri.startswith("file://"):
        return (root / uri[len("file:") :]).resolve().as_uri()
    if not _has_scheme(uri):
        return (root / uri).resolve().as_uri()
    return uri


def resolve_artifact_location(location: str | None, project_path: str | Path) -> str:
    """``None`` -> ``file://<root>/mlruns``; a relative path -> ``file://<root>/<path>``; URIs unchanged."""
    root = Path(project_path).expanduser().resolve()
    if location is None or not str(location).strip():
        return default_artifact_location(root)
    location = str(location).strip()
    if location.startswith("file:") and not location.startswith("file://"):
        return (root / location[len("file:") :]).resolve().as_uri()
    if not _has_scheme(location):
        return (root / location).resolve().as_uri()
    return location


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other schemes and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    path_part = uri[len("sqlite:///") :].partition("?")[0]
    if not path_part or path_part == ":memory:":
        return None
    return Path(path_part)


def runs_page_url(
    project_path: str | Path, experiment: str = DEFAULT_EXPERIMENT_NAME, base: str = "http://127.0.0.1:5000"
) -> str:
    """The MLflow UI page of ``experiment``'s training runs in the project's store. MLflow 3 opens an
    experiment on its GenAI overview unless the model-training view is asked for (``workflowType``)."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(None, project_path)
    database = sqlite_path(uri)
    found = None
    if database is None or database.exists():  # opening a missing sqlite store would create it
        found = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    page = f"experiments/{found.experiment_id}/runs" if found is not None else "experiments"
    return f"{base}/#/{page}?workflowType=machine_learning"


# ------------------------------------------------------------------------------------------ keys, values
def sanitize_key(key: str) -> str:
    """A key MLflow accepts as param, metric or tag name: bad characters -> ``_``, at most 250 chars."""
    key = _INVALID_KEY_CHARS.sub("_", str(key)) or "_"
    if posixpath.normpath(key) != key or key.startswith(("/", "..")) or key == ".":
        # MLflow rejects names that would normalise to another path (``a//b``, ``a/``, ``../a``).
        key = key.replace("/", "_")
        if key.startswith(".."):
            key = "_" + key.lstrip(".")
        key = key if key not in {"", "."} else "_"
    return key[:MAX_KEY_LENGTH]


def truncate(value: str, limit: int) -> str:
    """Cut ``value`` to ``limit`` characters, ending with ``TRUNCATION_MARKER`` when it was cut."""
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def _plain(value: Any) -> Any:
    """Pydantic models, dataclasses, enums, tuples/sets -> JSON-friendly Python objects (recursively)."""
    if isinstance(value, BaseModel):
        return _plain(value.model_dump())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [_plain(v) for v in items]
    if isinstance(value, Path):
        return value.as_posix()
    return value


def _to_param_string(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return json.dumps(value, default=str)
    return str(value)


def flatten_params(nested: Mapping[str, Any] | BaseModel, prefix: str = "") -> dict[str, str]:
    """Flatten nested parameters into ``{"a.b.c": "value"}`` strings for ``mlflow.log_params``.

    Mappings (and pydantic models via ``model_dump()``, dataclasses) are walked with dotted keys; lists and
    tuples become JSON (``[4, 8]``); an empty mapping becomes ``{}``. Keys are made MLflow-safe and values
    longer than MLflow's limit are cut, ending with ``...[truncated]``.
    """
    plain = _plain(nested)
    if not isinstance(plain, Mapping):
        return {sanitize_key(prefix or "value"): truncate(_to_param_string(plain), MAX_PARAM_VALUE_LENGTH)}
    flat: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Mapping):
            if not value and key:
                flat[sanitize_key(key)] = "{}"
            for sub_key, sub_value in value.items():
                walk(sub_value, f"{key}.{sub_key}" if key else str(sub_key))
            return
        flat[sanitize_key(key or "value")] = truncate(_to_param_string(value), MAX_PARAM_VALUE_LENGTH)

    walk(plain, prefix)
    return flat


def run_seeds(flat_params: Mapping[str, str]) -> str | None:
    """A kedro run's training seeds as a tag value: ``0``, or ``0 1 2`` for a grid of several seeds."""
    seeds = flat_params.get(SEEDS_PARAM)
    if seeds not in (None, "None", "null"):
        try:
            parsed = json.loads(seeds)
        except ValueError:
            parsed = seeds.split()
        return " ".join(str(seed) for seed in (parsed if isinstance(parsed, list) else [parsed]))
    return flat_params.get(SEED_PARAM)


def is_seed_key(key: str) -> bool:
    """Whether a flattened parameter is a seed (``distill.training.seed``, ``evaluate.rouge_seeds``)."""
    last = key.rsplit(".", 1)[-1]
    return last in {"seed", "seeds"} or last.endswith(("_seed", "_seeds"))


def config_fingerprint(flat_params: Mapping[str, str]) -> str:
    """Eight hex digits that differ whenever any parameter but a seed differs: runs with the same
    fingerprint (and environment) are repetitions of one configuration, and only they may be pooled."""
    kept = sorted((key, value) for key, value in flat_params.items() if not is_seed_key(key))
    return hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:8]


def to_float(value: Any) -> float | None:
    """A metric value as float: Python/numpy numbers and one-element tensors/arrays; else None.

    Booleans are not metrics (None). NaN and inf are kept: MLflow stores them.
    """
    if isinstance(value, bool) or value is None or isinstance(value, str | bytes):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)  # torch.Tensor, numpy scalars and arrays
    size = getattr(value, "numel", None) or getattr(value, "size", None)
    size = size() if callable(size) else size
    if callable(item) and (size is None or size == 1):
        try:
            scalar = item()
        except (TypeError, ValueError, RuntimeError):
            return None
        if isinstance(scalar, bool):
            return None
        if isinstance(scalar, numbers.Real):
            return float(scalar)
    return None


def numeric_scalars(nested: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric scalar leaves of a (nested) mapping as ``{"a.b": float}``; everything else is dropped."""
    out: dict[str, float] = {}
    for key, value in _plain(nested).items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(numeric_scalars(value, name))
            continue
        number = to_float(value)
        if number is not None:
            out[sanitize_key(name)] = number
    return out


# -------------------------------------------------------------------------------------------- logging
def log_step_metrics(metrics: Mapping[str, Any], step: int) -> None:
    """Log ``metrics`` at ``step`` to the MLflow run active in this thread; without one, do nothing.

    Inside a node tagged ``training`` run by ``SequentialRunner`` the active run is the node's child run
    (started by ``MLflowTrackingHook.before_node_run`` in the same thread); in other nodes it is the parent
    run of the ``kedro run``. Tensors and numpy scalars are converted to float, NaN/inf are logged as is,
    values that are not numbers are skipped with a warning. Never starts a run.
    """
    import mlflow

    if mlflow.active_run() is None:
        return
    values: dict[str, float] = {}
    for key, value in metrics.items():
        number = to_float(value)
        if number is None:
            logger.warning("log_step_metrics: %r=%r is not a number; not logged", key, value)
            continue
        values[sanitize_key(key)] = number
    if values:
        mlflow.log_metrics(values, step=int(step))
