"""Compare many ``kedro run``s from MLflow: the same table as the report, with training seeds as seeds.

The project's MLflow hook tags every evaluated model's run (``evaluation.subject`` / ``.variant`` /
``.objective``) and logs its metrics as ``evaluation.<benchmark>.<metric>``. Here those runs are read back
as records (``reporting.records`` schema), one per (run, metric), the seed being the run's training seed
(param ``distill.training.seed``), so runs repeated with other seeds become the spread in the table.

Only repetitions are pooled. Each evaluation belongs to the kedro run that evaluated it, and kedro runs are
grouped by environment (tag ``kedro.env``) and configuration (tag ``config``: the fingerprint of every
parameter but the seeds, ``tracking.config_fingerprint``); a comparison reads one group, by default the
newest, says which parent runs each column comes from, and refuses runs of several groups.

    kedro compare                                   # the newest group
    kedro compare --env test                        # the newest group of an environment
    kedro compare --run <parent run id> --run <another> --output data/08_reporting/comparison
    python -m warmup_distill_kedro.compare --objectives fkl,rkl

The table goes to stdout and everything else to stderr: ``kedro compare > table.md`` is plain Markdown.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from warmup_distill_kedro.tracking import (
    CONFIG_TAG,
    DEFAULT_EXPERIMENT_NAME,
    ENV_TAG,
    ITEMS_ARTIFACT,
    SEED_PARAM,
    SEED_TAG,
    config_fingerprint,
    is_seed_key,
    resolve_tracking_uri,
    sqlite_path,
)

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
METRIC_PREFIX = "evaluation."
# How many differing parameters a refusal to mix names.
SHOWN_DIFFERENCES = 6
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
    '`kedro run --pipelines=distill,evaluate,report --params "distill.seeds=1"`'
)


# -------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class RunGroup:
    """Kedro runs of one environment and configuration: repetitions, which differ in their seeds only."""

    env: str
    config: str
    parents: tuple[str, ...]  # run ids, newest first
    newest: int  # when its newest evaluation ended (ms)

    def describe(self) -> str:
        return f"environment {self.env!r}, configuration {self.config} ({len(self.parents)} kedro run(s))"


@dataclass
class Selection:
    """The records of one group of runs, and where they come from."""

    records: pd.DataFrame
    group: RunGroup
    other_groups: list[RunGroup]
    # column (variant, or the teacher) -> the parent runs its values come from: (run id, run name)
    sources: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    # (objective, variant) -> seed -> benchmark -> item scores: what the differences' intervals resample
    items: dict = field(default_factory=dict)
    runs_without_items: int = 0


class MixedRunsError(ValueError):
    """Runs of several configurations or environments were asked for together."""


def select_runs(
    tracking_uri: str,
    experiment: str = DEFAULT_EXPERIMENT_NAME,
    parent_run_ids: Sequence[str] | None = None,
    env: str | None = None,
    config: str | None = None,
) -> Selection:
    """The records of one group of kedro runs (one environment and configuration) of ``experiment``.

    ``parent_run_ids`` keeps the evaluated runs whose own id, parent run (``mlflow.parentRunId``) or
    evaluating run (``evaluation.parent_run_id``) is one of them; they must all be of one group, else
    MixedRunsError names the groups and the parameters they differ in. Otherwise the newest group is
    chosen, among those of ``env`` and whose configuration starts with ``config`` when given. Within the
    group, a (subject, seed) evaluated twice keeps the run that ended last (logged).
    Raises ValueError when the store or experiment does not exist or holds no evaluated runs.
    """
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
    by_group: dict[tuple[str, str], list[Run]] = {}
    for run in evaluated:
        by_group.setdefault(_group_key(_evaluating_run(run, by_id)), []).append(run)
    groups = sorted(
        (_group(key, members, by_id) for key, members in by_group.items()), key=lambda g: -g.newest
    )
    if parent_run_ids is not None and len(groups) > 1:
        raise MixedRunsError(_mixing_message(groups, by_id))
    chosen = [g for g in groups if (env is None or g.env == env) and g.config.startswith(config or "")]
    if not chosen:
        raise ValueError(
            f"no runs of {_wanted(env, config)} in MLflow experiment {experiment!r}; the store has "
            + "; ".join(g.describe() for g in groups)
        )
    group = chosen[0]
    members = by_group[(group.env, group.config)]
    latest = _latest_per_subject_and_seed([(run, _seed(run, by_id)) for run in members])
    rows = [row for run, seed in latest for row in _run_rows(run, seed)]
    records = _records_frame(rows)
    others = [g for g in groups if g is not group]
    items, without = _logged_items(tracking_uri, latest)
    return Selection(records, group, others, _sources(latest, by_id), items, without)


def _logged_items(tracking_uri: str, latest: list[tuple[Run, str]]) -> tuple[dict, int]:
    """Each evaluated run's item scores (the artifact the MLflow hook logs beside its metrics), keyed as
    `reporting.intervals.run_items` keys them, the seed being the run's; and how many runs had none
    (evaluated before the artifact existed)."""
    import json
    import tempfile

    from mlflow import MlflowClient

    from warmup_distill_kedro.reporting.intervals import run_items

    client = MlflowClient(tracking_uri=tracking_uri)
    evaluations, without = {}, 0
    with tempfile.TemporaryDirectory() as folder:
        for run, seed in latest:
            try:
                path = client.download_artifacts(run.info.run_id, ITEMS_ARTIFACT, folder)
            except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
                without += 1
                continue
            tags = run.data.tags
            evaluations[f"{run.info.run_id}/{seed}"] = {
                "objective": tags.get(OBJECTIVE_TAG),
                "variant": tags.get(VARIANT_TAG),
                "training_seed": seed,
                "items": json.loads(Path(path).read_text()),
            }
    return run_items(evaluations), without


def runs_records(
    tracking_uri: str,
    experiment: str = DEFAULT_EXPERIMENT_NAME,
    parent_run_ids: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The records (``reporting.records`` schema) of ``select_runs``: one per (evaluated run, metric)."""
    return select_runs(tracking_uri, experiment, parent_run_ids).records


def _records_frame(rows: list[dict]) -> pd.DataFrame:
    import pandas as pd

    from warmup_distill_kedro.reporting.records import RECORD_COLUMNS

    return pd.DataFrame(rows, columns=list(RECORD_COLUMNS)).astype({"seed": str, "value": float})


def _evaluating_run(run: Run, by_id: dict[str, Run]) -> Run:
    """The kedro run (parent run) that evaluated ``run``: its evaluation's configuration is that run's."""
    for tag in (EVALUATION_PARENT_TAG, PARENT_RUN_TAG):
        parent = by_id.get(run.data.tags.get(tag, ""))
        if parent is not None:
            return parent
    return run


def _group_key(parent: Run) -> tuple[str, str]:
    tags, params = parent.data.tags, parent.data.params
    # Runs tracked before the config tag existed: the same fingerprint, from their logged parameters.
    return tags.get(ENV_TAG, "unknown"), tags.get(CONFIG_TAG) or config_fingerprint(params)


def _group(key: tuple[str, str], members: list[Run], by_id: dict[str, Run]) -> RunGroup:
    parents: dict[str, int] = {}
    for run in members:
        parent = _evaluating_run(run, by_id)
        parents[parent.info.run_id] = max(parents.get(parent.info.run_id, 0), _finished(run))
    ordered = tuple(sorted(parents, key=lambda run_id: -parents[run_id]))
    return RunGroup(key[0], key[1], ordered, max(parents.values()))


def _mixing_message(groups: list[RunGroup], by_id: dict[str, Run]) -> str:
    lines = [
        f"the runs asked for are of {len(groups)} configurations, which kedro compare never pools "
        "(runs that differ in anything but the seed are not repetitions):"
    ]
    lines += [f"  {g.describe()}: {', '.join(g.parents)}" for g in groups]
    first, second = (by_id[g.parents[0]] for g in groups[:2])
    differences = _differences(first, second)
    if differences:
        shown = "; ".join(differences[:SHOWN_DIFFERENCES])
        more = (
            f" and {len(differences) - SHOWN_DIFFERENCES} more"
            if len(differences) > SHOWN_DIFFERENCES
            else ""
        )
        lines.append(f"  the first two differ in: {shown}{more}")
    lines.append("Compare the runs of one group: --run of one group only, or --env / --config.")
    return "\n".join(lines)


def _differences(first: Run, second: Run) -> list[str]:
    """``name: a vs b`` for the environment and every parameter but the seeds that differ."""
    out = []
    env = (first.data.tags.get(ENV_TAG), second.data.tags.get(ENV_TAG))
    if env[0] != env[1]:
        out.append(f"{ENV_TAG}: {env[0]} vs {env[1]}")
    a, b = first.data.params, second.data.params
    for key in sorted(set(a) | set(b)):
        if not is_seed_key(key) and a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key, '(unset)')} vs {b.get(key, '(unset)')}")
    return out


def _wanted(env: str | None, config: str | None) -> str:
    parts = [f"environment {env!r}" if env else "", f"configuration {config}" if config else ""]
    return " and ".join(part for part in parts if part) or "any group"


def _sources(latest: list[tuple[Run, str]], by_id: dict[str, Run]) -> dict[str, list[tuple[str, str]]]:
    """Column (the evaluated run's variant) -> the parent runs its values were evaluated by."""
    sources: dict[str, dict[str, str]] = {}
    for run, _ in latest:
        parent = _evaluating_run(run, by_id)
        column = run.data.tags.get(VARIANT_TAG, "?")
        sources.setdefault(column, {})[parent.info.run_id] = parent.info.run_name or ""
    return {column: sorted(parents.items()) for column, parents in sources.items()}


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
    """The training seed of the run that trained the evaluated model: its own `seed` tag (a grid cell's run,
    one seed each), else its kedro run's seeds (tag, then the parameter of runs that predate the tag)."""
    parent_id = run.data.tags.get(PARENT_RUN_TAG)
    parent = by_id.get(parent_id) if parent_id else None
    for source in (run, parent):
        if source is not None and source.data.tags.get(SEED_TAG):
            return source.data.tags[SEED_TAG]
    if SEED_PARAM in run.data.params:
        return run.data.params[SEED_PARAM]
    if parent is not None and SEED_PARAM in parent.data.params:
        return parent.data.params[SEED_PARAM]
    # No seed was logged: each kedro run then counts as its own repetition.
    return parent_id or run.info.run_id


def _finished(run: Run) -> int:
    return run.info.end_time or run.info.start_time or 0  # a run still going counts from its start


def _latest_per_subject_and_seed(runs: list[tuple[Run, str]]) -> list[tuple[Run, str]]:
    """One run per (subject, seed): repetitions of one configuration, so the one that ended last."""
    kept: dict[tuple[str, str], tuple[Run, str]] = {}
    for run, seed in sorted(runs, key=lambda item: _finished(item[0])):
        key = (run.data.tags[SUBJECT_TAG], seed)
        if key in kept:
            logger.info(
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
    for name, tag in (("variant", VARIANT_TAG), ("objective", OBJECTIVE_TAG)):
        if not tags.get(tag):
            raise ValueError(f"MLflow run {run.info.run_id} ({identity['subject']}): tag {tag!r} is missing")
        identity[name] = tags[tag]
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
    env: str | None = None,
    config: str | None = None,
) -> tuple[pd.DataFrame, str]:
    """The comparison table (``reporting.table.build_table``) of one group of runs (``select_runs``), and
    its Markdown, which ends with the parent runs each column comes from.

    ``variants`` / ``objectives`` select what is shown (default: everything the runs hold); naming one
    that no run has gives its rows status ``missing``.
    """
    selection = select_runs(tracking_uri, experiment, parent_run_ids, env, config)
    return comparison_of(selection, experiment, variants, objectives)


def comparison_of(
    selection: Selection,
    experiment: str = DEFAULT_EXPERIMENT_NAME,
    variants: Sequence[str] | None = None,
    objectives: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, str]:
    """The table and Markdown of a selection of runs (see ``compare_table``)."""
    from warmup_distill_kedro.reporting.markdown import render_markdown
    from warmup_distill_kedro.reporting.table import BEFORE_KD, DELTA_VARIANTS, TEACHER, build_table

    records = selection.records
    # Named variants/objectives select; the references (teacher, students before KD) stay with them.
    if variants is not None:
        records = records[records["variant"].isin([*variants, TEACHER])]
    if objectives is not None:
        records = records[records["objective"].isin([*objectives, TEACHER, BEFORE_KD])]
    # The distilled students' records: their variants are the columns (one measured before KD only, the
    # fairness control, is a reference row, as in the report) and their seeds the training seeds.
    distilled = records[~records["objective"].isin([TEACHER, BEFORE_KD])]
    if distilled.empty:
        distilled = records
    if variants is None:
        variants = _ordered_names(
            distilled["variant"],
            VARIANT_ORDER,
            exclude={TEACHER, *DELTA_VARIANTS},
        )
    if objectives is None:
        objectives = _ordered_names(records["objective"], OBJECTIVE_ORDER, exclude={TEACHER, BEFORE_KD})
    table = build_table(records, variants, objectives, selection.items)
    # A kedro run of several seeds evaluates its teacher and students before KD once, under the run's
    # seeds ("0 1 2"): the training seeds are the distilled students'.
    seeds = sorted(set(distilled["seed"]))
    if records["seed"].str.contains(" ").any():
        table.attrs["training_seeds"] = seeds
    title = f"Warmup-Distill comparison: experiment {experiment!r}, {len(seeds)} training seed(s)"
    markdown = render_markdown(table, title=title, seed_kind="training")
    shown = [TEACHER, *variants]
    return table, markdown + _runs_section(selection, [c for c in shown if c in selection.sources])


def _runs_section(selection: Selection, columns: Sequence[str]) -> str:
    """Which kedro runs the table pools: the group, and the parent runs each column comes from."""
    lines = [
        "",
        "## Runs",
        "",
        f"One group of kedro runs, pooled over their seeds only: {selection.group.describe()}.",
        "Parent runs (MLflow run id, name) each column comes from:",
        "",
    ]
    for column in columns:
        runs = ", ".join(f"{run_id} ({name})" for run_id, name in selection.sources[column])
        lines.append(f"- {column}: {runs}")
    if selection.runs_without_items:
        lines += [
            "",
            f"{selection.runs_without_items} evaluated run(s) have no item scores ({ITEMS_ARTIFACT}: evaluated "
            "before they were logged): differences that involve them show mean ± std, not an interval.",
        ]
    if selection.other_groups:
        lines += ["", "Other groups in the store, not pooled with these (choose with --env / --config):", ""]
        lines += [f"- {group.describe()}" for group in selection.other_groups]
    return "\n".join(lines) + "\n"


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


@contextmanager
def _logs_to_stderr() -> Iterator[None]:
    """Kedro's Rich log handler writes to stdout; while the command runs it writes to stderr, so that
    `kedro compare > table.md` holds the table and nothing else."""
    from rich.console import Console
    from rich.logging import RichHandler

    handlers = [h for h in logging.getLogger().handlers if isinstance(h, RichHandler)]
    consoles = [handler.console for handler in handlers]
    for handler in handlers:
        handler.console = Console(stderr=True)
    try:
        yield
    finally:
        for handler, console in zip(handlers, consoles, strict=True):
            handler.console = console


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
@click.option(
    "--run",
    "runs",
    multiple=True,
    help="Parent run id of a kedro run to include (repeatable); all must be of one environment and "
    "configuration.",
)
@click.option("--env", default=None, help="The newest group of runs of this Kedro environment.")
@click.option(
    "--config",
    default=None,
    help="The group of runs of this configuration (the runs' `config` tag, or its start).",
)
@click.option("--variants", callback=_comma_list, help="Comma list of student variants (default: found).")
@click.option("--objectives", callback=_comma_list, help="Comma list of KD objectives (default: found).")
@click.option(
    "--output", default=None, help="Path prefix: writes <prefix>.md and <prefix>.csv (never overwrites)."
)
def compare_command(
    experiment: str,
    tracking_uri: str | None,
    runs: tuple[str, ...],
    env: str | None,
    config: str | None,
    variants: list[str] | None,
    objectives: list[str] | None,
    output: str | None,
) -> None:
    """Compare the evaluated models of many kedro runs (seeds) from MLflow, as the report's table.

    Runs are pooled over their seeds only: by default the newest group of runs of one environment and
    configuration. The Markdown goes to stdout, everything else to stderr."""
    root = find_project_root()
    uri = resolve_tracking_uri(tracking_uri, root)
    paths = _output_paths(output) if output else None  # refuse before any work is done
    try:
        with _logs_to_stderr():
            selection = select_runs(uri, experiment, list(runs) or None, env, config)
            table, markdown = comparison_of(selection, experiment, variants, objectives)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"kedro compare: {selection.group.describe()}", err=True)
    if selection.other_groups:
        click.echo(
            f"kedro compare: {len(selection.other_groups)} other group(s) in the store, not pooled with it "
            "(listed at the end of the table; choose one with --env / --config)",
            err=True,
        )
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
