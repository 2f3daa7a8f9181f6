"""experiments/paired_difference.py: the report's paired interval between two cells of different runs, read
from the newest evaluation JSONs under a data root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "paired_difference.py"


def _write(root: Path, subject: str, version: str, correct: list[int], seed: int) -> None:
    folder = root / "08_reporting" / "evaluation" / f"{subject}.evaluation_metrics.json" / version
    folder.mkdir(parents=True)
    variant, objective = subject.split(".")[:2]
    ids = [f"q{i}" for i in range(len(correct))]
    evaluation = {
        "subject": subject, "variant": variant, "objective": objective, "training_seed": seed,
        "items": {"math": {"example_ids": ids, "scores": [float(c) for c in correct]}},
    }  # fmt: skip
    (folder / f"{subject}.evaluation_metrics.json").write_text(json.dumps(evaluation))


def test_the_difference_of_two_cells_across_runs_with_its_interval(tmp_path: Path) -> None:
    for seed in (0, 1):
        _write(tmp_path, f"vanilla.dpkd.seed{seed}", "2026-01-01T00.00.00.000Z", [0, 0, 0, 0], seed)
        # The newest version is read: dpkd gets every item right there, fkl none.
        _write(tmp_path, f"vanilla.dpkd.seed{seed}", "2026-01-02T00.00.00.000Z", [1, 1, 1, 1], seed)
        _write(tmp_path, f"vanilla.fkl.seed{seed}", "2026-01-01T00.00.00.000Z", [0, 0, 0, 0], seed)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "vanilla.dpkd", "vanilla.fkl", "--seeds", "0", "1", "--data-root", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "vanilla.dpkd - vanilla.fkl, math exact match (points): +100.0 [+100.0, +100.0] *" in result.stdout
    assert "Rouge-L: not measured on both sides" in result.stdout


def test_a_cell_without_evaluation_is_named(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "vanilla.dpkd", "vanilla.fkl", "--data-root", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0 and "no evaluation of vanilla.dpkd under" in result.stderr
