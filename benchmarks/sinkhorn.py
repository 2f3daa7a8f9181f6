"""Benchmark 5: what SinKD's Sinkhorn term costs (core/kd/sinkhorn.py), at 32k and 152k vocabularies.

The term's work is the L1 cost matrix D[i, j] = sum_v |S[i, v] - P[j, v]| between the N positions of a block:
N^2 V subtractions forward and as many in backward, against N V for a token-level divergence. So its share
of a step grows with the block: this script times forward + backward of `sinkhorn_loss` on one block of N
positions (float32 logits that require grad) beside the token-level `kd_loss("fkl")` on the same logits,
and measures the peak memory of each above its inputs (benchmarks/peak_memory.py, in its own run).

    python benchmarks/sinkhorn.py                  # blocks of 64 and 256 positions, V = 32,000 and 152,064
    python benchmarks/sinkhorn.py --quick          # smoke: V = 512, blocks of 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_seconds, summarize, write_report  # noqa: E402
from peak_memory import peak_memory  # noqa: E402

from warmup_distill_kedro.core.kd.losses import kd_loss  # noqa: E402
from warmup_distill_kedro.core.kd.sinkhorn import SINKHORN_DEFAULTS  # noqa: E402

MIB = 1024 * 1024


def measure(vocab: int, block: int, repeats: int, temperature: float) -> dict:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(1, block, vocab, generator=generator).requires_grad_(True)
    teacher = torch.randn(1, block, vocab, generator=generator)
    mask = torch.ones(1, block, dtype=torch.bool)

    def step(objective: str):
        def run() -> None:
            student.grad = None
            options = {"block": block} if objective == "sinkhorn" else {}
            kd_loss(objective, student, teacher, mask, temperature, **options).backward()

        return run

    steps = {"fkl": step("fkl"), "sinkhorn": step("sinkhorn")}
    times = interleaved_seconds(steps, repeats=repeats)
    row = {"vocab": vocab, "block": block}
    for name, run in steps.items():
        row[name] = summarize(times[name]) | {"peak_mib": peak_memory(run).peak_bytes / MIB}
    row["sinkhorn_over_fkl"] = statistics.median(
        s / f for s, f in zip(times["sinkhorn"], times["fkl"], strict=True)
    )
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        f"Sinkhorn term (epsilon {SINKHORN_DEFAULTS['epsilon']}, {SINKHORN_DEFAULTS['iters']} iterations) "
        "vs token-level fkl, forward + backward on one block:\n",
        "| vocabulary | block (positions) | fkl s | Sinkhorn s | Sinkhorn / fkl (median of rounds) "
        "| fkl peak MiB | Sinkhorn peak MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['vocab']:,} | {row['block']} | {row['fkl']['median_s']:.3f} | "
            f"{row['sinkhorn']['median_s']:.3f} | {row['sinkhorn_over_fkl']:.1f} | "
            f"{row['fkl']['peak_mib']:.0f} | {row['sinkhorn']['peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 152064])
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="smoke run: V = 512, blocks of 16, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.vocabs, args.blocks, args.repeats = [512], [16], 1
    rows = [measure(v, b, args.repeats, args.temperature) for v in args.vocabs for b in args.blocks]
    table = markdown(rows)
    print(table)
    write_report("sinkhorn", {"rows": rows}, table)


if __name__ == "__main__":
    main()
