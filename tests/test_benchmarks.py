"""Smoke runs of the benchmark scripts at toy sizes: they run end to end and write consistent reports.

The measurements themselves are `make bench`'s (docs/benchmarks.md); here only that the scripts work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str, results: Path) -> dict:
    env = {**os.environ, "BENCHMARK_RESULTS": str(results), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], check=True, env=env, capture_output=True
    )
    name = script.removesuffix(".py")
    report = next(results.glob(f"{name}*.json"))
    assert report.with_suffix(".md").read_text().startswith("<!-- ")
    return json.loads(report.read_text())


def test_kd_loss_benchmark_reports_memory_and_agreement(tmp_path):
    record = _run("kd_loss.py", "--quick", "--parts", "kd_loss", "--vocabs", "512", results=tmp_path)
    rows = record["results"]["kd_loss"]
    assert [row["path"] for row in rows] == ["unchunked", "kd_loss, chunk 32", "kd_loss, default"]
    assert all(row["peak_mib"] > 0 and row["median_s"] > 0 for row in rows)
    for row in rows[1:]:
        assert row["value_relative_difference"] < 1e-5 and row["grad_relative_difference"] < 1e-5
    assert rows[1]["peak_vs_unchunked"] < 1.0  # chunks of 32 positions hold less than all 128 at once
    assert record["machine"]["cpu_count"] >= 1 and "kd_loss.py" in record["command"]


def test_distill_step_benchmark_reports_the_ratio_to_its_bound(tmp_path):
    record = _run(
        "distill_step.py", "--preset", "tiny", "--repeats", "2", "--objectives", "fkl,js", results=tmp_path
    )
    results = record["results"]
    timings = results["timings"]
    assert set(timings) == {"teacher_forward", "student_sft_step", "distill_step_fkl", "distill_step_js"}
    assert all(timing["repeats"] == 2 for timing in timings.values())
    assert set(results["objectives"]) == {"fkl", "js"}
    for objective, summary in results["objectives"].items():
        ratios = summary["round_ratios"]
        assert len(ratios) == 2 and all(ratio > 0 for ratio in ratios)
        assert summary["ratio_to_bound"] == pytest.approx(sum(ratios) / 2)  # the median of two rounds
        assert f"| distill step {objective} |" in (tmp_path / "distill_step_tiny_fkl-js.md").read_text()
    assert results["tokens_per_step"] == 2 * 16
