"""The report's paired interval for any two cells of a project, also when different runs trained them (the
report pairs only the differences of its own grid: warmup - vanilla, objective - sft).

Reads the newest evaluation JSON of each run of the two cells (`<cell>.seed<s>` for the seeds given, or
`<cell>` for a one-seed run) under the project's data root and prints minuend - subtrahend on math exact
match and Rouge-L with its 95% interval (reporting/intervals.py: a paired bootstrap over the test items
and the seeds), marked `*` when it excludes 0. The two cells must have been evaluated on the same test
items (the same evaluate parameters). From the project root:

    python experiments/paired_difference.py vanilla.dpkd vanilla.fkl --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from warmup_distill_kedro.reporting.intervals import paired_interval, run_items

BENCHMARKS = {"math": "math exact match", "instruction": "Rouge-L"}


def newest_evaluation(root: Path, subject: str) -> dict:
    folder = root / "08_reporting" / "evaluation" / f"{subject}.evaluation_metrics.json"
    versions = sorted(folder.glob("*/*.json"))
    if not versions:
        raise SystemExit(f"no evaluation of {subject} under {folder}: run the evaluate pipeline for it first")
    return json.loads(versions[-1].read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("minuend", help="a cell, <variant>.<objective>")
    parser.add_argument("subtrahend", help="a cell, <variant>.<objective>")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="the training seeds of both cells")
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    args = parser.parse_args()
    cells = (args.minuend, args.subtrahend)
    subjects = [f"{c}.seed{s}" for c in cells for s in args.seeds] if args.seeds else list(cells)
    items = run_items({s: newest_evaluation(args.data_root, s) for s in subjects})
    sides = []
    for cell in cells:
        variant, objective = cell.split(".", 1)
        sides.append(items[(objective, variant)])
    for benchmark, label in BENCHMARKS.items():
        interval = paired_interval(*sides, [benchmark])
        if interval is None:
            print(f"{label}: not measured on both sides")
            continue
        mark = " *" if interval.resolved else ""
        print(
            f"{args.minuend} - {args.subtrahend}, {label} (points): {100 * interval.mean:+.1f} "
            f"[{100 * interval.low:+.1f}, {100 * interval.high:+.1f}]{mark}"
        )


if __name__ == "__main__":
    main()
