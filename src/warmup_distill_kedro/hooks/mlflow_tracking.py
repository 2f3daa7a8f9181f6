"""MLflow tracking for every ``kedro run``: one parent run, a nested child run per training node.

Configured by the ``mlflow:`` block of ``conf/<env>/mlflow*.yml`` (see ``tracking.TrackingConfig``).

* ``after_context_created``: validate the config, open the store, create/get the experiment.
* ``after_context_created`` also sets the experiment's kind to model training, so that MLflow 3 opens it on
  its runs, not on its GenAI overview.
* ``before_pipeline_run``: start the parent run, named so that a list of runs reads apart
  (``__default__ · test · vanilla+warmup × fkl+js · seed 0``: pipelines, environment, the parameters given
  on the command line or else the grid, the seed; ``parent_run_name``), tag it ``kedro.*``, ``config`` (the
  fingerprint of every parameter but the seeds) and ``seed``, log all parameters flattened
  (``training.lr``).
* nodes tagged ``training``: a child run (parentRunId = the parent) from ``before_node_run`` to
  ``after_node_run``, active in the node's thread so ``tracking.log_step_metrics`` lands in it. Tags:
  ``stage`` (the node's first other tag in sorted order, else its namespace), ``variant`` / ``objective``
  (from node tags ``variant.<x>`` / ``objective.<y>``; Kedro 1.7 allows only ``[\\w.-]`` in tags, so
  ``variant:<x>`` cannot be a node tag, but it is accepted too), the parent's ``kedro.env``, ``config`` and
  ``seed``, and the node's ``params:`` inputs. Named ``vanilla.fkl.distill · test · seed 0``
  (``child_run_name``).
* dict outputs whose dataset name ends with ``_metrics``: numeric leaves become metrics of the node's child
  run (plain keys) or, for other nodes, of the parent run (keys ``<dataset>.<key>``).
* nodes tagged ``evaluation``: their ``_metrics`` outputs are logged, as ``evaluation.<key>`` with tags
  ``evaluation.subject`` / ``variant`` / ``objective`` / ``parent_run_id``, to the run that trained the
  model they measure (the node's first input): the run tagged ``version.save.<model>`` with the version
  that was loaded. So a distilled student's run holds its training curve and its test scores. The parent
  run keeps a summary: each subject's headline scores (``math.exact_match/<subject>``); the details go to
  the parent only for a model no tracked run trained (a checkpoint given by path).
* nodes tagged ``mlflow_artifacts``: each output saved is logged as an artifact of the parent run, named
  after its dataset (a figure as ``.png``, a table as ``.csv``, text as ``.md``, a mapping as ``.json``).
* versioned datasets: tags ``version.load.<ds>`` / ``version.save.<ds>`` on the parent run and on the
  child run of the training node that loaded/saved them.
* status: FINISHED after the pipeline, FAILED for a failing node's child run and, on a pipeline error, for
  every open run, with tags ``error.type`` / ``error.message``.
* several processes (``accelerate launch ... -m kedro run``, docs/scaling.md): only the main process opens
  the store and tracks; the others start no run.

Kedro calls the dataset hooks outside the node hooks (loads before ``before_node_run``, saves after
``after_node_run``, see kedro/runner/task.py), so load tags are buffered until the child starts and save
tags are set on the (already ended) child through the client.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from kedro.config import MissingConfigException
from kedro.framework.hooks import hook_impl
from kedro.io import AbstractVersionedDataset, CachedDataset
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from pydantic import BaseModel, ValidationError

from warmup_distill_kedro import grid
from warmup_distill_kedro.core.models.conversion import AlreadyConverted
from warmup_distill_kedro.core.processes import is_main_process, process_rank_and_count
from warmup_distill_kedro.core.training.context import set_metrics_sink
from warmup_distill_kedro.tracking import (
    CONFIG_TAG,
    ENV_TAG,
    ITEMS_ARTIFACT,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_PER_BATCH,
    MAX_TAG_VALUE_LENGTH,
    SEED_PARAM,
    SEED_TAG,
    SEEDS_PARAM,
    TrackingConfig,
    config_fingerprint,
    flatten_params,
    log_step_metrics,
    numeric_scalars,
    resolve_artifact_location,
    resolve_tracking_uri,
    run_seeds,
    sanitize_key,
    sqlite_path,
    truncate,
)

if TYPE_CHECKING:
    from kedro.framework.context import KedroContext
    from kedro.pipeline import Pipeline
    from kedro.pipeline.node import Node

logger = logging.getLogger(__name__)

CONFIG_KEY = "mlflow"
TRAINING_TAG = "training"
EVALUATION_TAG = "evaluation"
EVALUATION_PREFIX = "evaluation"
METRICS_SUFFIX = "_metrics"
# Outputs of nodes tagged so are logged as artifacts of the parent run (figures, tables, text, mappings).
ARTIFACTS_TAG = "mlflow_artifacts"
# What the parent run keeps of each evaluation: the headline scores, one chart per (score, subject).
SUMMARY_METRICS = ("math.exact_match", "instruction.rouge_l")
# MLflow 3 opens an experiment on its GenAI overview unless it is marked as model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
RUN_NAME_SEPARATOR = " · "
MAX_NAME_PART_LENGTH = 80
ERROR_MESSAGE_LENGTH = 4000
_FINISHED = RunStatus.to_string(RunStatus.FINISHED)
_FAILED = RunStatus.to_string(RunStatus.FAILED)
_KILLED = RunStatus.to_string(RunStatus.KILLED)


class TrackingConfigError(ValueError):
    """The ``mlflow:`` config block is invalid (an unknown key, a wrong type)."""


class TrackingStoreError(RuntimeError):
    """The MLflow tracking store could not be opened."""


# ------------------------------------------------------------------------------------------------ config
def load_tracking_config(config_loader: Any) -> TrackingConfig:
    """The validated ``mlflow:`` block of ``conf/<env>/mlflow*.yml``; defaults when there is none."""
    try:
        raw = config_loader[CONFIG_KEY]
    except (KeyError, MissingConfigException):  # no "mlflow" config pattern / no conf/*/mlflow*.yml
        raw = None
    block = raw.get(CONFIG_KEY) if isinstance(raw, Mapping) else None
    if block is None:
        return TrackingConfig()
    if not isinstance(block, Mapping):
        raise TrackingConfigError(
            f"conf/*/mlflow*.yml: '{CONFIG_KEY}' must be a mapping with keys "
            f"{sorted(TrackingConfig.model_fields)}, got {type(block).__name__}"
        )
    try:
        return TrackingConfig.model_validate(dict(block))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(part) for part in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{CONFIG_KEY}.{key}'")
            else:
                problems.append(f"'{CONFIG_KEY}.{key}': {err['msg']}")
        raise TrackingConfigError(
            "Invalid MLflow tracking config in conf/*/mlflow*.yml: "
            + "; ".join(problems)
            + f" (allowed keys: {', '.join(TrackingConfig.model_fields)})"
        ) from None


def open_experiment(client: MlflowClient, tracking_uri: str, name: str, artifact_location: str) -> str:
    """Open the store at ``tracking_uri`` and return the id of experiment ``name`` (created if missing)."""
    db_file = sqlite_path(tracking_uri)
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            client.create_experiment(name, artifact_location=artifact_location)
        except mlflow.exceptions.MlflowException:
            pass  # created meanwhile by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise TrackingStoreError(f"MLflow experiment {name!r} could not be created")
    if experiment.lifecycle_stage == "deleted":
        logger.warning("MLflow experiment %r was deleted; restoring it", name)
        client.restore_experiment(experiment.experiment_id)
    # A store that opens may still refuse writes (read-only file, full disk): find out now, not mid-run.
    client.set_experiment_tag(experiment.experiment_id, "warmup_distill.opened_at", str(int(time.time())))
    client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id


def _redact(uri: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", uri)


# ------------------------------------------------------------------------------------------------- nodes
def is_training_node(node: Node) -> bool:
    return TRAINING_TAG in node.tags


def _tag_value(tags: Iterable[str], name: str) -> str | None:
    for tag in sorted(tags):
        for sep in (".", ":"):
            if tag.startswith(name + sep) and len(tag) > len(name) + 1:
                return tag[len(name) + 1 :]
    return None


def node_run_tags(node: Node) -> dict[str, str]:
    """Tags of a training node's child run: ``stage``, ``variant``, ``objective``, ``kedro.*``."""
    tags = {"kedro.node": node.name, "kedro.node_tags": ",".join(sorted(node.tags))}
    labels = ("variant.", "variant:", "objective.", "objective:", "seed.", "seed:")
    other = sorted(t for t in node.tags if t != TRAINING_TAG and not t.startswith(labels))
    # The stage is the pipeline's tag (namespaces name grid cells such as "vanilla.fkl", not stages).
    stage = (other[0] if other else None) or node.namespace
    if stage:
        tags["stage"] = stage
    for name in ("variant", "objective", SEED_TAG):
        value = _tag_value(node.tags, name)
        if value:
            tags[name] = value
    return tags


def node_params(node: Node, inputs: Mapping[str, Any]) -> dict[str, str]:
    """The node's ``params:`` (and ``parameters``) inputs, flattened: ``params:x`` -> ``x.key``."""
    flat: dict[str, str] = {}
    for name in node.inputs:
        if name not in inputs:
            continue
        if name == "parameters":
            flat.update(flatten_params(inputs[name]))
        elif name.startswith("params:"):
            flat.update(_flatten_value(inputs[name], name[len("params:") :]))
    return flat


def _flatten_value(value: Any, prefix: str) -> dict[str, str]:
    if isinstance(value, Mapping | BaseModel):
        return flatten_params(value, prefix=prefix)
    return flatten_params({prefix: value})


def pipeline_names(run_params: Mapping[str, Any]) -> list[str]:
    """``pipeline_names`` (Kedro 1.7) or ``pipeline_name`` (older), else ``["__default__"]``."""
    names = run_params.get("pipeline_names")
    if not names and run_params.get("pipeline_name"):
        names = [run_params["pipeline_name"]]
    if isinstance(names, str):
        names = [names]
    return [str(n) for n in names] if names else ["__default__"]


def parent_run_name(
    pipelines: list[str], env: str, runtime_params: Mapping[str, Any] | None, params: Mapping[str, Any]
) -> str:
    """``<pipelines> · <env> · <what changed> · seed <s>``: what changed is the parameters given on the
    command line, else the grid (``vanilla+warmup × fkl+js``, or ``× 8 objectives`` past four)."""
    parts = ["+".join(pipelines), env]
    given = flatten_params(runtime_params or {})
    if given:
        parts.append(_cut(", ".join(f"{key}={value}" for key, value in given.items())))
    else:
        distill = params.get("distill") or {}  # typed (DistillParams) once Kedro has validated it
        distill = distill.model_dump() if isinstance(distill, BaseModel) else distill
        variants = list(grid.spaced_names(distill.get("variants", grid.DEFAULT_VARIANTS)))
        objectives = list(grid.spaced_names(distill.get("objectives", grid.DEFAULT_OBJECTIVES)))
        shown = "+".join(objectives) if len(objectives) <= 4 else f"{len(objectives)} objectives"
        parts.append(f"{'+'.join(variants)} × {shown}")
    seeds = run_seeds(flatten_params(params))
    if seeds is not None and SEED_PARAM not in given and SEEDS_PARAM not in given:
        parts.append(f"seed{'s' if ' ' in seeds else ''} {seeds}")
    return RUN_NAME_SEPARATOR.join(parts)


def child_run_name(node: Node, env: str, seed: str | None) -> str:
    """``vanilla.fkl.distill · test · seed 0`` for a grid cell, ``sft_teacher · test`` for other nodes: the
    cell and stage read from the node's tags, the seed only where it is the cell's training seed. A run of a
    grid of several seeds has its seed in front, ``vanilla.fkl.seed1.distill · test``: MLflow's run list
    shows about the first 20 characters of a name, and the seed is what tells those runs apart."""
    tags = node_run_tags(node)
    if "variant" in tags and "objective" in tags:
        if SEED_TAG in tags:  # the node's own seed: one run of several
            label = (
                f"{tags['variant']}.{tags['objective']}.seed{tags[SEED_TAG]}.{tags.get('stage', node.name)}"
            )
            return RUN_NAME_SEPARATOR.join([label, env])
        label = f"{tags['variant']}.{tags['objective']}.{tags.get('stage', node.name)}"
        return RUN_NAME_SEPARATOR.join([label, env, *([f"seed {seed}"] if seed is not None else [])])
    return RUN_NAME_SEPARATOR.join([node.name, env])


def _cut(text: str) -> str:
    return text if len(text) <= MAX_NAME_PART_LENGTH else text[: MAX_NAME_PART_LENGTH - 1] + "…"


def evaluation_summary(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """The headline scores of one evaluation for the parent run: ``math.exact_match/<subject>``, ..."""
    subject = evaluation.get("subject") or "model"
    scores = numeric_scalars(evaluation)
    return {sanitize_key(f"{key}/{subject}"): scores[key] for key in SUMMARY_METRICS if key in scores}


def runner_name(value: Any) -> str:
    """The runner's class name from ``run_params["runner"]`` (``"None"`` means the default runner)."""
    if value is None or value == "None":
        return "SequentialRunner"
    if isinstance(value, type):
        return value.__name__
    if not isinstance(value, str):
        return type(value).__name__
    match = re.match(r"<([\w.]+) object at", value)
    return match.group(1).rsplit(".", 1)[-1] if match else value


# -------------------------------------------------------------------------------------------------- hook
class MLflowTrackingHook:
    """Kedro project hook: MLflow runs for ``kedro run`` (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._enabled = False
        self._config: TrackingConfig | None = None
        self._context: KedroContext | None = None
        self._client: MlflowClient | None = None
        self.tracking_uri: str | None = None
        self.experiment_id: str | None = None
        self._previous_uri_env: str | None = None
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self.parent_run_id: str | None = None
        self._catalog: Any = None
        self._session_id: str | None = None
        self._open_children: dict[str, str] = {}  # node name -> child run id, while the node runs
        self._children: dict[str, str] = {}  # node name -> child run id, for the whole kedro run
        self._pending_tags: dict[str, dict[str, str]] = {}  # node name -> load-version tags for its child
        self._run_tags: dict[str, str] = {}  # env, config and seed: on the parent and on every child

    @property
    def tracking(self) -> bool:
        """True while a parent run is open."""
        return self._enabled and self.parent_run_id is not None

    # ---------------------------------------------------------------------------------------- context
    @hook_impl
    def after_context_created(self, context: KedroContext) -> None:
        self._enabled = False
        self._context = context
        config = load_tracking_config(context.config_loader)
        self._config = config
        if not config.enabled:
            logger.info("MLflow tracking is disabled (mlflow.enabled: false)")
            return
        if not is_main_process():  # `accelerate launch -m kedro run`: one tracked run, by the main process
            logger.info(
                "MLflow: process %d tracks nothing; the main process does", process_rank_and_count()[0]
            )
            return
        uri = resolve_tracking_uri(config.tracking_uri, context.project_path)
        artifact_location = resolve_artifact_location(config.artifact_location, context.project_path)
        try:
            client = MlflowClient(tracking_uri=uri)
            experiment_id = open_experiment(client, uri, config.experiment_name, artifact_location)
        except Exception as exc:
            self._store_unavailable(uri, exc)
            return
        # set_tracking_uri also writes $MLFLOW_TRACKING_URI; remember it so that a later session in the same
        # process (tests, notebooks) resolves its own store instead of inheriting this one.
        self._previous_uri_env = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        self._client, self.tracking_uri, self.experiment_id = client, uri, experiment_id
        self._enabled = True

    def _store_unavailable(self, uri: str, exc: Exception) -> None:
        """The store at ``uri`` could not be opened or written: stop, or (``on_store_error:
        continue_untracked``) say so and leave tracking off for the whole run."""
        if self._config.on_store_error == "continue_untracked":
            logger.warning(
                "MLflow: the tracking store %r cannot be used (%s: %s); this run is NOT tracked "
                "(mlflow.on_store_error: continue_untracked)",
                _redact(uri),
                type(exc).__name__,
                exc,
            )
            return
        raise TrackingStoreError(
            f"Could not open the MLflow tracking store {_redact(uri)!r} "
            f"({type(exc).__name__}: {exc}). Fix 'mlflow.tracking_uri' in conf/<env>/mlflow.yml, "
            "or set 'mlflow.enabled: false' (or 'mlflow.on_store_error: continue_untracked') there to run "
            "without tracking."
        ) from exc

    # --------------------------------------------------------------------------------------- pipeline
    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any) -> None:
        if not self._enabled:
            return
        with self._lock:
            if self.parent_run_id is not None:  # the previous run never reached its end hooks
                self._end_runs([*self._open_children.values(), self.parent_run_id], _KILLED)
            self._reset_run_state()
            self._catalog = catalog
        names = pipeline_names(run_params)
        self._session_id = str(run_params.get("session_id") or run_params.get("run_id") or "")
        params = self._params()
        flat_params = flatten_params(params)
        env = self._env(run_params)
        self._run_tags = {ENV_TAG: env, CONFIG_TAG: config_fingerprint(flatten_params(self._configured()))}
        seeds = run_seeds(flat_params)
        if seeds is not None:
            self._run_tags[SEED_TAG] = seeds
        run_name = parent_run_name(names, env, run_params.get("runtime_params"), params)
        tags = {
            **self._run_tags,
            "kedro.session_id": self._session_id,
            "kedro.pipelines": ",".join(names),
            "kedro.runner": runner_name(run_params.get("runner")),
            "kedro.version": str(run_params.get("kedro_version") or ""),
        }
        filters = ("tags", "node_names", "from_nodes", "to_nodes", "from_inputs", "to_outputs", "namespaces")
        for key in filters:
            if run_params.get(key):
                tags[f"kedro.{key}"] = ",".join(map(str, run_params[key]))
        if run_params.get("load_versions"):
            tags["kedro.load_versions"] = json.dumps(run_params["load_versions"], default=str)
        nested = mlflow.active_run() is not None
        if nested:
            logger.warning(
                "MLflow run %s is already active: the kedro run is tracked as a run nested in it",
                mlflow.active_run().info.run_id,
            )
        run = mlflow.start_run(
            experiment_id=self.experiment_id,
            run_name=run_name,
            tags={k: truncate(v, MAX_TAG_VALUE_LENGTH) for k, v in tags.items()},
            nested=nested,
            log_system_metrics=False,
        )
        self.parent_run_id = run.info.run_id
        self._log_params(self.parent_run_id, flat_params)
        logger.info(
            "MLflow run %s (%s) in experiment %r at %s",
            self.parent_run_id,
            run_name,
            self._config.experiment_name if self._config else "",
            _redact(self.tracking_uri or ""),
        )

    @hook_impl
    def after_pipeline_run(
        self, run_params: dict[str, Any], run_result: Any, pipeline: Pipeline, catalog: Any
    ) -> None:
        if not self.tracking:
            return
        with self._lock:
            runs = [*self._open_children.values(), self.parent_run_id]
            self._open_children.clear()
        self._end_runs(runs, _FINISHED)
        self._finish()

    @hook_impl
    def on_pipeline_error(
        self, error: Exception, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any
    ) -> None:
        if not self.tracking:
            return
        with self._lock:
            runs = [*self._open_children.values(), self.parent_run_id]
            self._open_children.clear()
        for run_id in runs:
            self._best_effort("tag the error", self._tag_error, run_id, error)
        self._end_runs(runs, _FAILED)
        self._finish()

    def _finish(self) -> None:
        self.parent_run_id = None
        self._catalog = None
        if self._previous_uri_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = self._previous_uri_env

    # ------------------------------------------------------------------------------------------- nodes
    @hook_impl
    def before_node_run(
        self, node: Node, catalog: Any, inputs: dict[str, Any], is_async: bool, run_id: str
    ) -> None:
        if self.tracking and is_training_node(node):
            self._best_effort(f"start the child run of node {node.name!r}", self._start_child, node, inputs)
            # The node's training runs report each step to the MLflow run active in this thread (the child).
            set_metrics_sink(log_step_metrics)

    @hook_impl
    def after_node_run(
        self,
        node: Node,
        catalog: Any,
        inputs: dict[str, Any],
        outputs: dict[str, Any],
        is_async: bool,
        run_id: str,
    ) -> None:
        set_metrics_sink(None)
        if not self.tracking:
            return
        with self._lock:
            child = self._open_children.pop(node.name, None)
        for name, data in outputs.items():
            if not name.endswith(METRICS_SUFFIX) or not isinstance(data, Mapping | BaseModel):
                continue
            if child:
                self._best_effort(f"log metrics of {name!r}", self._log_metrics, child, numeric_scalars(data))
            elif EVALUATION_TAG in node.tags:
                self._best_effort(f"log {name!r} to the model's run", self._log_evaluation, node, name, data)
            else:
                metrics = numeric_scalars(data, prefix=name)
                self._best_effort(f"log metrics of {name!r}", self._log_metrics, self.parent_run_id, metrics)
        if child:
            self._best_effort(f"end the child run of node {node.name!r}", self._end_runs, [child], _FINISHED)

    @hook_impl
    def on_node_error(
        self,
        error: Exception,
        node: Node,
        catalog: Any,
        inputs: dict[str, Any],
        is_async: bool,
        run_id: str,
    ) -> None:
        set_metrics_sink(None)
        if not self.tracking:
            return
        with self._lock:
            child = self._open_children.pop(node.name, None)
        if child:
            self._best_effort("tag the error", self._tag_error, child, error)
            self._best_effort(f"end the child run of node {node.name!r}", self._end_runs, [child], _FAILED)

    # ---------------------------------------------------------------------------------------- datasets
    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any, node: Node) -> None:
        if not self.tracking:
            return
        version = self._dataset_version(dataset_name, "load")
        if version is None:
            return
        key = sanitize_key(f"version.load.{dataset_name}")
        self._best_effort("tag a load version", self._client.set_tag, self.parent_run_id, key, version)
        if is_training_node(node):  # loads happen before before_node_run: tag the child when it starts
            with self._lock:
                child = self._open_children.get(node.name)
                if child is None:
                    self._pending_tags.setdefault(node.name, {})[key] = version
            if child is not None:
                self._best_effort("tag a load version", self._client.set_tag, child, key, version)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node: Node) -> None:
        if not self.tracking:
            return
        if ARTIFACTS_TAG in node.tags:
            self._best_effort(f"log {dataset_name!r} as an artifact", self._log_artifact, dataset_name, data)
        version = self._dataset_version(dataset_name, "save")
        if isinstance(data, AlreadyConverted):  # nothing was written: the run's output is the kept version
            version = data.metadata.get("catalog_version")
        if version is None:
            return
        key = sanitize_key(f"version.save.{dataset_name}")
        with self._lock:
            child = self._children.get(node.name)  # saves happen after after_node_run ended the child
        for run_id in filter(None, (self.parent_run_id, child)):
            self._best_effort("tag a save version", self._client.set_tag, run_id, key, version)

    # ----------------------------------------------------------------------------------------- helpers
    def _log_artifact(self, dataset_name: str, data: Any) -> None:
        """An output of a node tagged ARTIFACTS_TAG, as an artifact of the parent run named after its
        dataset: a figure as PNG, a table as CSV, text as Markdown, a mapping as JSON."""
        run_id = self.parent_run_id
        if isinstance(data, Figure):
            self._client.log_figure(run_id, data, f"{dataset_name}.png")
        elif isinstance(data, pd.DataFrame):
            self._client.log_text(run_id, data.to_csv(index=False), f"{dataset_name}.csv")
        elif isinstance(data, str):
            self._client.log_text(run_id, data, f"{dataset_name}.md")
        elif isinstance(data, Mapping):
            self._client.log_dict(run_id, dict(data), f"{dataset_name}.json")
        else:
            logger.info("MLflow: %s (%s) is not logged as an artifact", dataset_name, type(data).__name__)

    def _env(self, run_params: Mapping[str, Any]) -> str:
        loader = getattr(self._context, "config_loader", None)
        return str(
            run_params.get("env")
            or getattr(loader, "env", None)
            or getattr(loader, "default_run_env", None)
            or "local"
        )

    def _params(self) -> Mapping[str, Any]:
        """The run's parameters (``context.params``: conf plus runtime params), read at pipeline start when
        the session has scoped parameter validation to the pipelines being run (and cached it)."""
        if self._context is None:
            return {}
        try:
            return self._context.params or {}
        except Exception as exc:  # the session itself fails on invalid parameters; never hide that here
            logger.warning("MLflow: could not read the parameters to log them: %s", exc)
            return {}

    def _configured(self) -> Mapping[str, Any]:
        """The parameters as configured (conf/ and --params), before validation fills in defaults: the
        validated ones depend on which pipelines run (Kedro validates only theirs), so two runs of one
        configuration would not compare equal."""
        try:
            return self._context.config_loader["parameters"] if self._context is not None else {}
        except Exception as exc:
            logger.warning("MLflow: could not read the configured parameters: %s", exc)
            return {}

    def _start_child(self, node: Node, inputs: Mapping[str, Any]) -> None:
        own = node_run_tags(node)
        with self._lock:
            tags = {
                **self._run_tags,
                **own,
                "kedro.session_id": self._session_id or "",
                **self._pending_tags.pop(node.name, {}),
            }
        # A grid cell's run has one training seed: its node's (a grid of several seeds), else the run's.
        seed = own.get(SEED_TAG) or (
            self._run_tags.get(SEED_TAG) if "variant" in own and "objective" in own else None
        )
        if seed is None:
            tags.pop(SEED_TAG, None)  # the run's seed is the distill cells' training seed, not others'
        else:
            tags[SEED_TAG] = seed
        run_name = child_run_name(node, self._run_tags.get(ENV_TAG, ""), seed)
        active = mlflow.active_run()
        if active is None or active.info.run_id == self.parent_run_id:
            run = mlflow.start_run(
                experiment_id=self.experiment_id,
                run_name=run_name,
                nested=True,
                parent_run_id=self.parent_run_id,
                tags=tags,
                log_system_metrics=False,
            )
            child_id = run.info.run_id
        else:
            logger.warning(
                "MLflow run %s is active in node %r's thread: its child run is not made active, so "
                "log_step_metrics goes to the other run",
                active.info.run_id,
                node.name,
            )
            child_id = self._client.create_run(
                self.experiment_id,
                run_name=run_name,
                tags={**tags, MLFLOW_PARENT_RUN_ID: self.parent_run_id, MLFLOW_RUN_NAME: run_name},
            ).info.run_id
        with self._lock:
            self._open_children[node.name] = child_id
            self._children[node.name] = child_id
        self._log_params(child_id, node_params(node, inputs))

    def _log_evaluation(self, node: Node, dataset: str, evaluation: Mapping[str, Any]) -> None:
        """Log an evaluation to the run that trained the measured model (the node's first input): the run
        tagged with the version of that model it saved; the parent run gets the headline scores. Without a
        producer run (an unversioned checkpoint given by path), the details go to the parent run too."""
        summary = evaluation_summary(evaluation)
        model = node.inputs[0]
        version = self._dataset_version(model, "load")
        producer = self._producer_run(model, version) if version else None
        if producer is None:
            logger.info(
                "MLflow: no tracked run saved %s %s; its evaluation is on this run only", model, version
            )
            summary |= numeric_scalars(evaluation, prefix=dataset)
        self._log_metrics(self.parent_run_id, summary)
        if producer is None:
            return
        self._log_metrics(producer, numeric_scalars(evaluation, prefix=EVALUATION_PREFIX))
        for field in ("subject", "variant", "objective"):
            if isinstance(evaluation.get(field), str):
                self._client.set_tag(producer, f"{EVALUATION_PREFIX}.{field}", evaluation[field])
        self._client.set_tag(producer, f"{EVALUATION_PREFIX}.parent_run_id", self.parent_run_id)
        if isinstance(evaluation.get("items"), Mapping):
            self._client.log_dict(producer, dict(evaluation["items"]), ITEMS_ARTIFACT)

    def _producer_run(self, dataset_name: str, version: str) -> str | None:
        """The child run (else the parent run) tagged ``version.save.<dataset_name>`` = ``version``."""
        key = sanitize_key(f"version.save.{dataset_name}")
        runs = self._client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{key}` = '{version}'", max_results=100
        )
        children = [run for run in runs if MLFLOW_PARENT_RUN_ID in run.data.tags]
        chosen = (children or runs)[:1]
        return chosen[0].info.run_id if chosen else None

    def _end_runs(self, run_ids: Iterable[str | None], status: str) -> None:
        """End runs in order (children before their parent): pop them off this thread's active-run stack
        when they are on top of it, else terminate them through the client."""
        for run_id in run_ids:
            if run_id is None:
                continue
            active = mlflow.active_run()
            if active is not None and active.info.run_id == run_id:
                mlflow.end_run(status)
            else:
                self._client.set_terminated(run_id, status)

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])

    def _log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in metrics.items()]
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=items[start : start + MAX_METRICS_PER_BATCH])

    def _tag_error(self, run_id: str, error: BaseException) -> None:
        self._client.set_tag(run_id, "error.type", type(error).__name__)
        self._client.set_tag(run_id, "error.message", truncate(str(error), ERROR_MESSAGE_LENGTH))

    def _dataset_version(self, dataset_name: str, mode: str) -> str | None:
        """The resolved load/save version of a versioned dataset, from the dataset object in the catalog
        (``DataCatalog.get`` in Kedro 1.7; no data is loaded). None for unversioned datasets."""
        catalog = self._catalog
        if catalog is None:
            return None
        try:
            getter = getattr(catalog, "get", None)
            dataset = getter(dataset_name) if callable(getter) else catalog[dataset_name]
        except Exception:
            return None
        if isinstance(dataset, CachedDataset):
            dataset = dataset._dataset
        if not isinstance(dataset, AbstractVersionedDataset):
            return None
        try:
            version = dataset.resolve_load_version() if mode == "load" else dataset.resolve_save_version()
        except Exception as exc:
            logger.debug("MLflow: no %s version for %s: %s", mode, dataset_name, exc)
            return None
        return str(version) if version else None

    @staticmethod
    def _best_effort(what: str, func: Any, *args: Any) -> None:
        """Tracking must not break a run mid-way (the saves come after ``after_node_run``): log instead."""
        try:
            func(*args)
        except Exception as exc:
            logger.warning("MLflow: could not %s: %s: %s", what, type(exc).__name__, exc, exc_info=True)
