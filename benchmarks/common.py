"""What every benchmark shares: the machine description, medians of repeats, peak memory, the reports.

Each benchmark script writes `benchmarks/results/<name>.json` (every number, the machine, the command)
and `benchmarks/results/<name>.md` (the table that goes into docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

# $BENCHMARK_RESULTS moves the reports elsewhere (the smoke tests write them to a temporary folder).
RESULTS = Path(os.environ.get("BENCHMARK_RESULTS", Path(__file__).resolve().parent / "results"))


def describe_machine() -> dict[str, Any]:
    """Processor, cores, threads, accelerator and package versions: what a reader needs to compare."""
    import accelerate
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


def wall_seconds(fn: Callable[[], Any]) -> float:
    """Wall time of one `fn()` call, the GPU's queued work included."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def summarize(times: list[float]) -> dict[str, float]:
    """Median, min and max of repeated wall times."""
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
    }


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median, min and max wall time of `fn()` over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    return summarize([wall_seconds(fn) for _ in range(repeats)])


def interleaved_seconds(
    steps: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall times of each of `steps` over `repeats` rounds, every round calling each step once in order
    (after `warmup` untimed rounds): times meant to be compared come from the same minutes, so that the
    machine's drift from minute to minute (about 10% on the project's CPU machine) does not bias them."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(wall_seconds(step))
    return times


def write_report(name: str, results: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write `<name>.json` (results + machine + command + date) and `<name>.md` under benchmarks/results/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": describe_machine(),
        "results": results,
    }
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    machine = record["machine"]
    header = (
        f"<!-- {record['command']} on {record['date']} -->\n"
        f"Machine: {machine['processor']}, {machine['cpu_count']} cores ({machine['torch_threads']} torch "
        f"threads), GPU: {machine['gpu'] or 'none'}; torch {machine['torch']}, transformers "
        f"{machine['transformers']}.\n\n"
    )
    md_path.write_text(header + markdown.rstrip() + "\n")
    return json_path, md_path
