"""benchmarks/: smoke runs of the benchmark scripts at toy sizes (they run end to end and write consistent
reports), and peak_memory.py, the CPU replay of the profiler's allocation events, on known cases.

The measurements themselves are `make bench`'s (docs/benchmarks.md); here only that the scripts work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from peak_memory import peak_memory  # noqa: E402


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
    own = ["unchunked", "kd_loss, chunk 32", "kd_loss, default"]
    assert [row["path"] for row in rows[:3]] == own
    # each fkl peer is either measured (installed: .bench-peers/ or the bench extra) or named as missing
    peers = [row["path"] for row in rows[3:]] + list(record["results"]["settings"]["missing_peers"])
    assert sorted(peers) == [
        "TRL generalized_jsd_loss",
        "torchtune ForwardKLWithChunkedOutputLoss (gradient only)",
    ]
    assert all(row["peak_mib"] > 0 and row["median_s"] > 0 for row in rows)
    for row in rows[1:3]:
        assert row["value_relative_difference"] < 1e-5 and row["grad_relative_difference"] < 1e-5
    assert all(row["time_vs_project"] > 0 and row["peak_vs_project"] > 0 for row in rows)
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


def test_sinkhorn_benchmark_times_the_term_beside_fkl(tmp_path):
    record = _run("sinkhorn.py", "--quick", results=tmp_path)
    (row,) = record["results"]["rows"]
    assert (row["vocab"], row["block"]) == (512, 16)
    assert all(row[name]["median_s"] > 0 and row[name]["peak_mib"] > 0 for name in ("fkl", "sinkhorn"))
    assert row["sinkhorn_over_fkl"] > 0
    assert "| 512 | 16 |" in (tmp_path / "sinkhorn.md").read_text()


# -- peak_memory.py ----------------------------------------------------------------------------------------
MB = 1000 * 1000


def test_one_tensor_made_and_dropped():
    measured = peak_memory(lambda: float(torch.ones(1000, 1000).sum()))  # 4 MB of float32
    assert 4 * MB <= measured.peak_bytes < 4 * MB + 4096
    assert measured.retained_bytes < 4096  # freed before the end
    assert measured.result == 1e6


def test_two_live_at_once_and_what_is_kept():
    def fn():
        a = torch.ones(1000, 1000)
        b = torch.ones(500, 1000)  # both alive: 6 MB
        del a, b
        return torch.ones(250, 1000)  # 1 MB kept by the result

    measured = peak_memory(fn)
    assert 6 * MB <= measured.peak_bytes < 6 * MB + 4096
    assert MB <= measured.retained_bytes < MB + 4096
    assert measured.result.shape == (250, 1000)


def test_inputs_are_the_baseline_and_backward_is_seen():
    x = torch.randn(1000, 1000, requires_grad=True)  # allocated before: not counted

    def fn():
        (x.exp() * 2).sum().backward()  # exp saved for backward (4 MB), its product (4 MB), then x.grad

    measured = peak_memory(fn)
    assert 8 * MB <= measured.peak_bytes < 16 * MB
    assert 4 * MB <= measured.retained_bytes < 4 * MB + 4096  # x.grad
    assert x.grad is not None


def test_refuses_other_devices():
    with pytest.raises(ValueError, match="cpu or cuda"):
        peak_memory(lambda: None, device="meta")


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_every_benchmark_script_imports(script):
    """The scripts make bench runs import the project's modules by name: a moved module breaks them."""
    import importlib

    assert importlib.import_module(script).__doc__
