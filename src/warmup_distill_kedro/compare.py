"""Compare many ``kedro run``s from MLflow: the same table as the report, with training seeds as seeds.

The project's MLflow hook tags every evaluated model's run (``evaluation.subject`` / ``.variant`` /
``.objective``) and logs its metrics as ``evaluation.<benchmark>.<metric>``. Here those runs are read back
as records (``reporting.records`` schema), one per (run, metric), the seed being the run's training seed
(param ``distill.training.seed``), so runs repeated with other seeds become the spread in the table.

    kedro compare --run <parent run id> --run <another> --output data/08_reporting/comparison
    python -m warmup_distill_kedro.compare --objectives fkl,rkl
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from warmup_distill_kedro.tracking import DEFAULT_EXPERIMENT_NAME, resolve_tracking_uri, sqlite_path

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Run

# mlflow, pandas and the reporting package are imported where they are used: Kedro imports this module
# for every `kedro` command (the project_commands entry point), and they would add seconds to each.

logger = logging.getLogger(__name__)

# mlflow.utils.mlflow_tags.PARENT_RUN_TAG, spelled out to keep mlflow out of the import.
PARENT_RUN_TAG = "mlflow.parentRunId"

SUBJECT_TAG = "evaluation.subject"
VARIANT_TAG = "evaluation.variant"
OBJECTIVE_TAG = "evaluation.objective"
EVALUATION_PARENT_TAG = "evaluation.parent_run_id"
SEED_PARAM = "distill.training.seed"
METRIC_PREFIX = "evaluation."
# MLflow metric -> (benchmark, metric) of the records. The instruction std is the spread over sampling
# seeds within one run; across runs the spread comes from the runs themselves, so it is not a record.
RUN_METRICS = {
    "evaluation.math.exact_match": ("math", "exact_match"),
    "evaluation.instruction.rouge_l": ("instruction", "rouge_l"),
    "evaluation.distribution.heldout_nll": ("distribution", "heldout_nll"),
    "evaluation.distribution.heldout_kl": ("distribution", "heldout_kl"),
    "evaluation.distribution.heldout_entropy": ("distribution", "heldout_entropy"),
    "evaluation.distribution.rejected_share": ("distribution", "rejected_share"),
}
# Display order of what the runs hold; names not listed follow in alphabetical order.
VARIANT_ORDER = ("vanilla", "warmup", "control")
OBJECTIVE_ORDER = ("fkl", "rkl", "js", "tvd", "skl", "srkl", "akl", "dskd", "dskd_cma", "sft")
HOW_TO_PRODUCE = (
    "run the evaluate pipeline with tracking on, e.g. "
    '`kedro run --pipelines=distill,evaluate,report --params "distill.training.seed=1"`'
)


# -------------------------------------------------------------------------------------------- records
def runs_records(
    tracking_uri: str,
    experiment: str = DEFAULT_EXPERIMENT_NAME,
    parent_run_ids: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One record per (evaluated run, metric) of ``experiment`` in the store at ``tracking_uri``.

    The seed of a record is the run's ``distill.training.seed`` param, else its parent run's, else the
    parent run id. ``parent_run_ids`` keeps the runs whose own id, parent run (``mlflow.parentRunId``) or
    evaluating run (``evaluation.parent_run_id``) is one of them. When a (subject, seed) was evaluated in
    more than one run, the run that ended last is kept, with a logged warning.
    Raises ValueError when the store or experiment does not exist or holds no evaluated runs.
    """
    import pandas as pd

    from warmup_distill_kedro.reporting.records import RECORD_COLUMNS

    runs = _experiment_runs(tracking_uri, experiment)
    by_id = {run.info.run_id: run for run in runs}
    evaluated = [run for run in runs if SUBJECT_TAG in run.data.tags]
    if parent_run_ids is not None:
        wanted = set(parent_run_ids)
        evaluated = [run for run in evaluated if wanted & _related_ids(run)]
    if not evaluated:
        restriction = f" among the runs {sorted(set(parent_run_ids))}" if parent_run_ids is not None else ""
        raise ValueError(
            f"no evaluated runs (tag {SUBJECT_TAG!r}) in MLflow experiment {experiment!r} of the store "
            f"{tracking_uri}{restriction}; {HOW_TO_PRODUCE}"
        )
    latest = _latest_per_subject_and_seed([(run, _seed(run, by_id)) for run in evaluated])
    rows = [row for run, seed in latest for row in _run_rows(run, seed)]
    return pd.DataFrame(rows, columns=list(RECORD_COLUMNS)).astype({"seed": str, "value": float})


def _experiment_runs(tracking_uri: str, experiment: str) -> list[Run]:
    database = sqlite_path(tracking_uri)
    if database is not None and not database.exists():
        # Opening a missing sqlite store would create an empty one: say where it was looked for instead.
        raise ValueError(f"no MLflow store at {database} (tracking URI {tracking_uri}); {HOW_TO_PRODUCE}")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment {experiment!r} in the store {tracking_uri}; {HOW_TO_PRODUCE}")
    return list(_all_runs(client, found.experiment_id))


def _all_runs(client: MlflowClient, experiment_id: str) -> Iterator[Run]:
    from mlflow.entities import ViewType

    token = None
    while True:
        page = client.search_runs([experiment_id], run_view_type=ViewType.ACTIVE_ONLY, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _related_ids(run: Run) -> set[str]:
    tags = run.data.tags
    ids = {run.info.run_id, tags.get(PARENT_RUN_TAG), tags.get(EVALUATION_PARENT_TAG)}
    return {run_id for run_id in ids if run_id}


def _seed(run: Run, by_id: dict[str, Run]) -> str:
    if SEED_PARAM in run.data.params:
        return run.data.params[SEED_PARAM]
    parent_id = run.data.tags.get(PARENT_RUN_TAG)
    parent = by_id.get(parent_id) if parent_id else None
    if parent is not None and SEED_PARAM in parent.data.params:
        return parent.data.params[SEED_PARAM]
    # No seed was logged: each kedro run then counts as its own repetition.
    return parent_id or run.info.run_id


def _latest_per_subject_and_seed(runs: list[tuple[Run, str]]) -> list[tuple[Run, str]]:
    def finished(item: tuple[Run, str]) -> int:
        info = item[0].info
        return info.end_time or info.start_time or 0  # a run still going counts from its start

    kept: dict[tuple[str, str], tuple[Run, str]] = {}
    for run, seed in sorted(runs, key=finished):
        key = (run.data.tags[SUBJECT_TAG], seed)
        if key in kept:
            logger.warning(
                "MLflow: %s with seed %s was evaluated in runs %s and %s; keeping %s, which ended last",
                key[0],
                seed,
                kept[key][0].info.run_id,
                run.info.run_id,
                run.info.run_id,
            )
        kept[key] = (run, seed)
    return list(kept.values())


def _run_rows(run: Run, seed: str) -> list[dict]:
    tags = run.data.tags
    identity = {"subject": tags[SUBJECT_TAG]}
    for field, tag in (("variant", VARIANT_TAG), ("objective", OBJECTIVE_TAG)):
        if not tags.get(tag):
            raise ValueError(f"MLflow run {run.info.run_id} ({identity['subject']}): tag {tag!r} is missing")
        identity[field] = tags[tag]
    rows = []
    for key, value in sorted(run.data.metrics.items()):
        if key not in RUN_METRICS:
            continue
        if math.isnan(value):
            logger.warning("MLflow run %s: metric %s is NaN; left out", run.info.run_id, key)
            continue
        benchmark, metric = RUN_METRICS[key]
        rows.append({**identity, "benchmark": benchmark, "metric": metric, "seed": seed, "value": value})
    return rows


# --------------------------------------------------------------------------------------------- table
def compare_table(
    tracking_uri: str,
    experiment: str = DEFAULT_EXPERIMENT_NAME,
    parent_run_ids: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    objectives: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, str]:
    """The comparison table (``reporting.table.build_table``) of the evaluated runs, and its Markdown.

    ``variants`` / ``objectives`` select what is shown (default: everything the runs hold); naming one
    that no run has gives its rows status ``missing``.
    """
    from warmup_distill_kedro.reporting.markdown import render_markdown
    from warmup_distill_kedro.reporting.table import BEFORE_KD, DELTA_VARIANTS, TEACHER, build_table

    records = runs_records(tracking_uri, experiment, parent_run_ids)
    # Named variants/objectives select; the references (teacher, students before KD) stay with them.
    if variants is not None:
        records = records[records["variant"].isin([*variants, TEACHER])]
    if objectives is not None:
        records = records[records["objective"].isin([*objectives, TEACHER, BEFORE_KD])]
    if variants is None:
        variants = _ordered_names(records["variant"], VARIANT_ORDER, exclude={TEACHER, *DELTA_VARIANTS})
    if objectives is None:
        objectives = _ordered_names(records["objective"], OBJECTIVE_ORDER, exclude={TEACHER, BEFORE_KD})
    table = build_table(records, variants, objectives)
    n_runs = len(set(records["seed"]))
    title = f"Warmup-Distill comparison: experiment {experiment!r}, {n_runs} training seed(s)"
    return table, render_markdown(table, title=title, seed_kind="training")


def _ordered_names(values: pd.Series, order: Sequence[str], exclude: set[str]) -> list[str]:
    found = set(values) - exclude
    known = [name for name in order if name in found]
    return known + sorted(found - set(known))


# ----------------------------------------------------------------------------------------------- CLI
def find_project_root(start: Path | None = None) -> Path:
    """The Kedro project containing ``start`` (default: the current directory), else ``start`` itself."""
    from kedro.utils import find_kedro_project  # kept local: the library functions above need no Kedro

    start = Path.cwd() if start is None else Path(start)
    return find_kedro_project(start.resolve()) or start.resolve()


def _comma_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise click.BadParameter(f"expected a comma-separated list of names, got {value!r}", ctx, param)
    return names


def _output_paths(prefix: str) -> tuple[Path, Path]:
    base = Path(prefix)
    markdown, csv = base.with_name(base.name + ".md"), base.with_name(base.name + ".csv")
    existing = [str(path) for path in (markdown, csv) if path.exists()]
    if existing:
        raise click.ClickException(
            f"--output {prefix}: {', '.join(existing)} already exist(s); choose another prefix "
            "(comparisons are never overwritten)"
        )
    return markdown, csv


@click.command(name="compare")
@click.option(
    "--experiment", default=DEFAULT_EXPERIMENT_NAME, show_default=True, help="MLflow experiment name."
)
@click.option(
    "--tracking-uri",
    default=None,
    help="MLflow store; default: $MLFLOW_TRACKING_URI, else sqlite mlflow.db at the project root.",
)
@click.option("--run", "runs", multiple=True, help="Parent run id of a kedro run to include (repeatable).")
@click.option("--variants", callback=_comma_list, help="Comma list of student variants (default: found).")
@click.option("--objectives", callback=_comma_list, help="Comma list of KD objectives (default: found).")
@click.option(
    "--output", default=None, help="Path prefix: writes <prefix>.md and <prefix>.csv (never overwrites)."
)
def compare_command(
    experiment: str,
    tracking_uri: str | None,
    runs: tuple[str, ...],
    variants: list[str] | None,
    objectives: list[str] | None,
    output: str | None,
) -> None:
    """Compare the evaluated models of many kedro runs (seeds) from MLflow, as the report's table."""
    root = find_project_root()
    uri = resolve_tracking_uri(tracking_uri, root)
    paths = _output_paths(output) if output else None  # refuse before any work is done
    try:
        table, markdown = compare_table(uri, experiment, list(runs) or None, variants, objectives)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(markdown)
    if paths is not None:
        markdown_path, csv_path = paths
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        # Mode "x" fails if the file appeared since the check instead of overwriting it.
        with markdown_path.open("x", encoding="utf-8") as handle:
            handle.write(markdown)
        with csv_path.open("x", encoding="utf-8", newline="") as handle:
            table.to_csv(handle, index=False)
        click.echo(f"wrote {markdown_path} and {csv_path}", err=True)


@click.group(name="warmup-distill")
def commands() -> None:
    """Project commands of warmup-distill-kedro (registered through `kedro.project_commands`)."""


commands.add_command(compare_command)


if __name__ == "__main__":
    compare_command()
