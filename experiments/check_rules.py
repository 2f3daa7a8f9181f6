"""Which sampled tokens each check rule flags, on the same scored rollouts: the teacher_prob rule
(p(y_t) < tau) against the margin rule (log q(y_t) - log p(y_t) > tau), side by side.

Reads the newest `scored_rollouts` of a project (after `make demo`, or `kedro run --pipelines=probe,check`),
which holds the teacher's and the student's log-probability of every sampled token, and applies both rules
to them (no model runs), from the project root:

    .venv/bin/python experiments/check_rules.py --prob-tau 0.1 --margin-tau 2.3

Prints, per rule: the share of sampled tokens flagged, the share of rollouts with a flag, the mean position
of the first flag, the share of flagged tokens that are digits; and how much the two rules agree (tokens
flagged by both, by one only). The student's token texts come from the project's student tokenizer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from warmup_distill_kedro.core.models.tokenization import load_tokenizer


def _latest(folder: Path) -> Path:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))[-1] / folder.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prob-tau", type=float, default=0.1)
    parser.add_argument("--margin-tau", type=float, default=2.3)
    parser.add_argument("--data", type=Path, default=Path("data"))
    args = parser.parse_args()
    table = pd.read_parquet(_latest(args.data / "07_model_output/scored_rollouts.parquet"))
    if set(table["vocabulary"]) != {table["vocabulary"].iloc[0]}:
        raise SystemExit("the rollouts come from more than one tokenizer")
    tokenizer = load_tokenizer(_latest(args.data / "06_models/student_tokenizer"))
    teacher = [np.asarray(lp, dtype=np.float64) for lp in table["teacher_logprobs"]]
    student = [np.asarray(lp, dtype=np.float64) for lp in table["student_logprobs_aligned"]]
    rules = {
        f"teacher_prob (p < {args.prob_tau:g})": [np.exp(t) < args.prob_tau for t in teacher],
        f"margin (log q - log p > {args.margin_tau:g})": [
            s - t > args.margin_tau for s, t in zip(student, teacher, strict=True)
        ],
    }
    eos = tokenizer.eos_token_id
    texts = [
        [tokenizer.decode([i]) if i != eos else "<eos>" for i in ids] for ids in table["teacher_token_ids"]
    ]
    n_tokens = sum(len(t) for t in teacher)
    print(f"{len(table)} rollouts, {n_tokens} scored tokens (EOS decisions included)\n")
    print(
        "| rule | tokens flagged | rollouts flagged | first flag (token) | flagged tokens that are digits | EOS among flagged |"
    )
    print("|---|---|---|---|---|---|")
    for name, flags in rules.items():
        flagged = np.concatenate(flags)
        firsts = [int(np.flatnonzero(f)[0]) for f in flags if f.any()]
        tokens = [
            text for f, row in zip(flags, texts, strict=True) for text, hit in zip(row, f, strict=True) if hit
        ]
        digits = np.mean([t.strip().isdigit() for t in tokens]) if tokens else float("nan")
        eos_share = np.mean([t == "<eos>" for t in tokens]) if tokens else float("nan")
        print(
            f"| {name} | {100 * flagged.mean():.1f}% | {100 * np.mean([f.any() for f in flags]):.1f}% | "
            f"{np.mean(firsts):.1f} | {100 * digits:.1f}% | {100 * eos_share:.1f}% |"
        )
    prob, margin = (np.concatenate(f) for f in rules.values())
    both = (prob & margin).sum()
    print(
        f"\nflagged by both: {both} tokens; by teacher_prob only: {(prob & ~margin).sum()}; by margin only: "
        f"{(margin & ~prob).sum()} (Jaccard {both / max((prob | margin).sum(), 1):.2f})"
    )


if __name__ == "__main__":
    main()
