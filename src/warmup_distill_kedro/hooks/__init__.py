"""The project's Kedro hooks (settings.HOOKS), one module each.

- `grid.py`: reads the distill grid's shape from the run's parameters before pipelines are built.
- `inputs.py`: every external input of a run (checkpoint folders, earlier stages' outputs) checked before the first node.
- `mlflow_tracking.py`: one MLflow run per `kedro run`, a child run per training node.
- `training_state.py`: the resumable-state folder of every training node.
- `processes.py`: under `accelerate launch`, only the main process writes the catalog.
"""
