"""Kedro project settings: the hooks (distill grid shape, inputs checked before the first node, MLflow,
resumable training, several processes), and the config patterns the project adds."""

import warnings

from transformers.utils import logging as transformers_logging

from warmup_distill_kedro.hooks.grid import GridParametersHook
from warmup_distill_kedro.hooks.inputs import InputsCheckHook
from warmup_distill_kedro.hooks.mlflow_tracking import MLflowTrackingHook
from warmup_distill_kedro.hooks.processes import MainProcessWritesHook
from warmup_distill_kedro.hooks.training_state import TrainingStateHook

# GridParametersHook first: it reads the distill grid's shape before any pipeline is built.
# MainProcessWritesHook: under `accelerate launch`, processes other than the main one keep their outputs
# in memory (docs/scaling.md); with one process it does nothing.
# InputsCheckHook runs first in before_pipeline_run (tryfirst): a run that cannot start opens no MLflow run.
HOOKS = (
    GridParametersHook(),
    InputsCheckHook(),
    MLflowTrackingHook(),
    TrainingStateHook(),
    MainProcessWritesHook(),
)

# kedro_mlflow may be installed in a user's environment; it would take over tracking with its file store.
DISABLE_HOOKS_FOR_PLUGINS = ("kedro_mlflow",)

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "config_patterns": {
        "mlflow": ["mlflow*", "mlflow*/**"],
    },
    # Environments (test, gpu, local) override single keys deep inside the base parameters.
    "merge_strategy": {"parameters": "soft", "mlflow": "soft"},
}

# Kedro 1.7's own config loader calls a deprecated omegaconf function: two warnings of 15 lines on every
# command, nothing a user can act on.
warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated", category=UserWarning)

# transformers draws a progress bar for every checkpoint it writes or reads; the catalog already logs both.
transformers_logging.disable_progress_bar()
