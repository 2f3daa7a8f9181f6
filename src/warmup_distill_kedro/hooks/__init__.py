"""The project's Kedro hooks (settings.HOOKS), one module each.

- `grid.py`: reads the distill grid's shape from the run's parameters before pipelines are built.
- `mlflow_tracking.py`: one MLflow run per `kedro run`, a child run per training node.
- `training_state.py`: the resumable-state folder of every training node.
- `processes.py`: under `accelerate launch`, only the main process writes the catalog.
"""
