"""Distill and evaluate grid cells over several training seeds and step budgets, then print the math exact
match and Rouge-L of each (budget, variant, objective) as mean ± std over the seeds, and the paired
differences warmup - vanilla and control - vanilla (the same seed on both sides).

It runs in a project whose bootstrap and warmup outputs exist (after `make demo`), from the project root:

    .venv/bin/python experiments/kd_grid.py --variants vanilla warmup control --objectives fkl \\
        --steps 25 50 100 300 --seeds 0 1 2
    .venv/bin/python experiments/kd_grid.py --variants vanilla --objectives fkl \\
        --set teacher_cache.enabled=true teacher_cache.top_k=32      # any other distill parameter

Only the cells' nodes run: a setting that changes a shared node's output needs that node run first (the
teacher's top-k cache: `kedro run --pipeline=distill --nodes=cache_teacher_logits --params=...` with the
same teacher_cache settings; a cache of other settings is refused, naming them). The cells read the latest
version of each dataset, or the one pinned by `--load-versions teacher_topk=<version>` (caches of several
k built once, each grid reading its own).

Each (budget, seed) runs the distill pipeline restricted to each objective's cells (one timed session per
objective: the cost column) and then the evaluate pipeline on every chosen cell (the KD set, teachers and
students are the latest versions in the catalog); the numbers are read back from the evaluation JSONs
that run wrote. A budget is a whole run of that many optimizer steps (its own
warmup + cosine schedule), not a point on a longer run. The table also goes to
data/08_reporting/experiments/kd_grid-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from itertools import product
from pathlib import Path

import yaml
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

BENCHMARKS = {"math": ("math", "exact_match"), "rouge_l": ("instruction", "rouge_l")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["vanilla", "warmup", "control"])
    parser.add_argument("--objectives", nargs="+", default=["fkl"])
    parser.add_argument("--steps", nargs="+", type=int, default=[300])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--env", default=None)
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="more distill parameters, dotted, the value read as YAML: teacher_cache.enabled=true "
        "teacher_cache.top_k=32",
    )
    parser.add_argument(
        "--load-versions",
        nargs="+",
        default=[],
        metavar="NAME=VERSION",
        help="datasets the cells read at a pinned version, not the latest: teacher_topk=2026-12-03T18.51.04.221Z "
        "(one cache per top_k, built once, read by grids in any order)",
    )
    args = parser.parse_args()
    load_versions = dict(_pair(pin, "--load-versions", "teacher_topk=VERSION") for pin in args.load_versions)
    project = Path.cwd()
    bootstrap_project(project)
    cells = [f"{v}.{o}" for v, o in product(args.variants, args.objectives)]
    results: dict[str, dict[str, dict[str, float]]] = {}  # "<steps>/<seed>" -> cell -> benchmark -> value
    seconds: dict[str, list[float]] = {objective: [] for objective in args.objectives}  # per step, each run
    for steps, seed in product(args.steps, args.seeds):
        distill = {
            "variants": args.variants,
            "objectives": args.objectives,
            "seeds": [seed],  # one seed per session: the cells keep their plain names (vanilla.fkl)
            "training": {"max_steps": steps, "eval_every": max(1, steps // 3)},
        }
        for setting in args.set:
            _set_dotted(distill, setting)
        # One session per objective, timed: its cells' wall time per optimizer step is the cost column.
        for objective in args.objectives:
            objective_cells = [f"{v}.{objective}" for v in args.variants]
            started = time.perf_counter()
            with KedroSession.create(project, env=args.env, runtime_params={"distill": distill}) as session:
                session.run(
                    pipeline_names=["distill"], namespaces=objective_cells, load_versions=load_versions
                )
            seconds[objective].append((time.perf_counter() - started) / (steps * len(args.variants)))
        with KedroSession.create(project, env=args.env, runtime_params={"distill": distill}) as session:
            session.run(pipeline_names=["evaluate"], namespaces=cells)
        results[f"{steps}/{seed}"] = {cell: _latest_scores(project, cell) for cell in cells}
    table = summarise(results, args) + "\n\n" + cost_table(seconds)
    print(table)
    out = project / "data/08_reporting/experiments"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kd_grid-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {"args": vars(args), "results": results, "seconds_per_step": seconds, "table": table}, indent=2
        )
    )
    print(f"\nwritten: {path}")


def _pair(setting: str, option: str, example: str) -> tuple[str, str]:
    key, separator, value = setting.partition("=")
    if not separator or not key:
        raise SystemExit(f"{option} {setting!r}: expected KEY=VALUE, e.g. {example}")
    return key, value


def _set_dotted(params: dict, setting: str) -> None:
    key, value = _pair(setting, "--set", "teacher_cache.top_k=32")
    *parents, leaf = key.split(".")
    for parent in parents:
        params = params.setdefault(parent, {})
    params[leaf] = yaml.safe_load(value)


def _latest_scores(project: Path, cell: str) -> dict[str, float]:
    folder = project / f"data/08_reporting/evaluation/{cell}.evaluation_metrics.json"
    latest = sorted(folder.iterdir())[-1] / folder.name
    evaluation = json.loads(latest.read_text())
    scores = {}
    for name, (benchmark, metric) in BENCHMARKS.items():
        block = evaluation.get(benchmark)
        if block is not None:
            scores[name] = 100 * block[metric]
    return scores


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}" if values else "-"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def summarise(results: dict, args: argparse.Namespace) -> str:
    """One Markdown table: per budget and objective, each variant's mean ± std over seeds, and the
    paired differences against vanilla."""
    others = [v for v in args.variants if v != "vanilla"] if "vanilla" in args.variants else []
    header = ["steps", "objective", *(f"{b}: {v}" for b in BENCHMARKS for v in args.variants)]
    header += [f"{b}: {v} - vanilla" for b in BENCHMARKS for v in others]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for steps, objective in product(args.steps, args.objectives):
        runs = [results[f"{steps}/{seed}"] for seed in args.seeds]
        row = [str(steps), objective]
        for benchmark, variant in product(BENCHMARKS, args.variants):
            row.append(_mean_std([r[f"{variant}.{objective}"][benchmark] for r in runs]))
        for benchmark, variant in product(BENCHMARKS, others):
            differences = [
                r[f"{variant}.{objective}"][benchmark] - r[f"vanilla.{objective}"][benchmark] for r in runs
            ]
            row.append(_mean_std(differences) + f" ({', '.join(f'{d:+.1f}' for d in differences)})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def cost_table(seconds: dict[str, list[float]]) -> str:
    """Wall seconds per optimizer step of each objective's distill run (its cells together, the model
    loading and validation included), median and range over the runs, and the ratio to the first
    objective's median: the ratio is what to read on a machine shared with other work."""
    first = statistics.median(next(iter(seconds.values())))
    lines = ["| objective | s / step (median, min-max) | x first |", "|---|---|---|"]
    for objective, values in seconds.items():
        median = statistics.median(values)
        lines.append(
            f"| {objective} | {median:.2f} ({min(values):.2f}-{max(values):.2f}) | {median / first:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
