"""Benchmark 3: rollout throughput of the probe (prompts/s) and of the teacher check (sequences/s).

Uses the trained demo checkpoints and parameters of the project copy that benchmarks/demo_stages.py
leaves in benchmarks/results/demo_project (run that first), through the pipelines' own node functions:
`probe` (the student samples `n_samples` responses per prompt) and `score_rollouts` (one teacher pass
per rollout). Each is timed as the median of repeats on the first `--prompts` probe prompts.

    python benchmarks/rollouts.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, write_report  # noqa: E402
from demo_stages import PROJECT  # noqa: E402
from kedro.framework.session import KedroSession  # noqa: E402
from kedro.framework.startup import bootstrap_project  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from warmup_distill_kedro.core.warmup.probe import ProbeConfig  # noqa: E402
from warmup_distill_kedro.pipelines.check.nodes import score_rollouts  # noqa: E402
from warmup_distill_kedro.pipelines.check.params import CheckParams  # noqa: E402
from warmup_distill_kedro.pipelines.probe.nodes import probe  # noqa: E402


def _typed(model: type[BaseModel], value: Any, **updates: Any) -> Any:
    """A stage's parameters as its pydantic model, with `updates`: the context may hold the dict or the model."""
    data = value.model_dump() if isinstance(value, BaseModel) else dict(value)
    return model(**{**data, **updates})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not (PROJECT / "data" / "06_models" / "teacher_model").is_dir():
        sys.exit(f"no demo checkpoints under {PROJECT}: run `python benchmarks/demo_stages.py` first")
    bootstrap_project(PROJECT)
    with KedroSession.create(project_path=PROJECT) as session:
        context = session.load_context()
        catalog, params = context.catalog, context.params
        student, teacher = catalog.load("student_model"), catalog.load("teacher_model")
        train_examples = catalog.load("train_examples")
    probe_params = _typed(ProbeConfig, params["probe"], max_prompts=args.prompts, show_progress=False)
    check_params = _typed(CheckParams, params["check"], show_progress=False)

    rollouts = probe(student, train_examples, probe_params)
    probe_time = median_seconds(lambda: probe(student, train_examples, probe_params), args.repeats, warmup=0)
    check_time = median_seconds(
        lambda: score_rollouts(rollouts, teacher, check_params), args.repeats, warmup=0
    )
    n_prompts, n_sequences = rollouts["prompt_id"].nunique(), len(rollouts)
    tokens = int(rollouts["n_tokens"].sum())
    results = {
        "prompts": n_prompts,
        "samples_per_prompt": probe_params.n_samples,
        "sequences": n_sequences,
        "sampled_tokens": tokens,
        "probe": {**probe_time, "prompts_per_s": n_prompts / probe_time["median_s"]},
        "check": {**check_time, "sequences_per_s": n_sequences / check_time["median_s"]},
        "probe_batch_size": probe_params.batch_size,
        "check_batch_size": check_params.batch_size,
    }
    markdown = "\n".join(
        [
            f"{n_prompts} training prompts x {probe_params.n_samples} samples = {n_sequences} rollouts "
            f"({tokens / n_sequences:.1f} sampled tokens each), demo student and teacher.",
            "",
            "| stage | median | throughput |",
            "| --- | --- | --- |",
            f"| probe (student samples, batch {probe_params.batch_size}) | {probe_time['median_s']:.2f} s | "
            f"{n_prompts / probe_time['median_s']:.1f} prompts/s ({tokens / probe_time['median_s']:,.0f} tokens/s) |",
            f"| check (teacher scores, batch {check_params.batch_size}) | {check_time['median_s']:.2f} s | "
            f"{n_sequences / check_time['median_s']:.1f} sequences/s |",
        ]
    )
    write_report("rollouts", results, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
