"""Benchmark 4: the whole default flow (`make demo`'s `kedro run`), wall time stage by stage.

Runs each stage as its own `kedro run --pipelines=<stage>` in a fresh copy of the project (its own data/
and mlflow.db; the checkout's outputs are not touched), in the order `kedro run` runs them. Each stage's
time includes one Kedro start-up (the `report` stage is mostly that); `make demo` pays it once.
The copy is kept (`benchmarks/results/demo_project/`) for benchmarks/rollouts.py, which uses its checkpoints.

    python benchmarks/demo_stages.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("data", "bootstrap", "probe", "check", "warmup", "distill", "evaluate", "report")
PROJECT = RESULTS / "demo_project"


def make_project(folder: Path) -> None:
    """The project's conf/ (without conf/local) and pyproject.toml, with empty data/: a fresh run."""
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(ROOT / "conf", folder / "conf", ignore=shutil.ignore_patterns("local"))
    (folder / "conf" / "local").mkdir()
    shutil.copy(ROOT / "pyproject.toml", folder / "pyproject.toml")
    (folder / "src").mkdir()  # Kedro checks that it exists; the package itself is installed
    (folder / "data").mkdir()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    args = parser.parse_args()
    make_project(PROJECT)
    kedro = Path(sys.executable).with_name("kedro")
    env = {
        **os.environ,
        "KEDRO_DISABLE_TELEMETRY": "true",
        "MLFLOW_TRACKING_URI": f"sqlite:///{PROJECT / 'mlflow.db'}",
    }
    seconds: dict[str, float] = {}
    for stage in args.stages:
        started = time.perf_counter()
        with open(PROJECT / f"{stage}.log", "w") as log:
            subprocess.run(
                [str(kedro), "run", f"--pipelines={stage}"],
                cwd=PROJECT,
                env=env,
                stdout=log,
                stderr=log,
                check=True,
            )
        seconds[stage] = time.perf_counter() - started
        print(f"{stage}: {seconds[stage]:.1f} s", flush=True)
    total = sum(seconds.values())
    rows = [f"| {stage} | {s:.1f} | {100 * s / total:.0f}% |" for stage, s in seconds.items()]
    markdown = "\n".join(
        [
            "| stage | seconds | share |",
            "| --- | --- | --- |",
            *rows,
            f"| **total** | **{total:.1f}** ({total / 60:.1f} min) | |",
        ]
    )
    write_report("demo_stages", {"seconds": seconds, "total_s": total}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
