"""Benchmark 1: the KD loss at large vocabularies, memory and time.

Part 1, `kd_loss` from logits: forward + backward on float32 student logits [1, tokens, V] that require
grad (the teacher's do not), at V = 32,000 and 152,064 (Qwen2.5's padded vocabulary). The unchunked
baseline is the textbook loss with autograd over the full logits (`divergence(...).mean()`); against it,
`core.kd.losses.kd_loss` with `chunk_size` positions per chunk and with its default (for fkl and rkl a
closed form whose chunk is sized to stay in the CPU caches). The issue's goal at 152k: the chunked loss
needs at most 35% of the unchunked one's extra memory, with the same value (relative difference below 1e-5).

Part 2, the distill loss from hidden states: `core.kd.fused.fused_distillation_loss` (neither model's
full logits ever exist) against the naive path (both heads' full logits, then 0.5 CE + 0.5 KD with
autograd over them) and the project's `distillation_loss` on those logits, forward + backward to the
student's hidden states and head, at Qwen2.5 sizes: student hidden 1536 with 151,936 head rows (1.5B),
teacher hidden 3584 with 152,064 rows (7B), KD over the tokenizer's 151,665 ids. Goal: the fused peak is
at most a quarter of the naive one.

Memory is the peak allocated above the inputs (logits, hidden states and head weights are allocated
before and not counted; gradients made during the call are), measured by benchmarks/peak_memory.py in
its own run (the profiler it uses on CPU slows the code down); times are medians of separate runs.

Beside the project's loss, part 1 measures its peers on the same logits when they are installed
(`pip install -e '.[bench]'`, or `make bench-peers`, which puts them in `.bench-peers/` with
`pip install --no-deps`; either way the project's torch stays; a peer that does not import is named, with
the reason, in the output and the report), with their time and peak as ratios to the project's default:
TRL's `GKDTrainer.generalized_jsd_loss` (beta 0 is fkl, beta 0.5 js) and torchtune's
`ForwardKLWithChunkedOutputLoss` (fkl only, without a temperature: it is given the logits divided by T; it
returns the cross-entropy to the teacher, which differs from the KL by the teacher's entropy, so only its
gradient is compared).

    python benchmarks/kd_loss.py           # 1024 tokens, both parts
    python benchmarks/kd_loss.py --quick   # smoke: 128 tokens, one repeat
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, write_report  # noqa: E402
from peak_memory import peak_memory  # noqa: E402

from warmup_distill_kedro.core.kd.divergences import divergence  # noqa: E402
from warmup_distill_kedro.core.kd.fused import fused_distillation_loss  # noqa: E402
from warmup_distill_kedro.core.kd.losses import KDConfig, distillation_loss, kd_loss  # noqa: E402
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX  # noqa: E402

MIB = 2**20
PEERS = Path(__file__).resolve().parents[1] / ".bench-peers"


PEER_INSTALL = "pip install -e '.[bench]' (or make bench-peers: --no-deps, into .bench-peers/)"


def peer_losses(
    objective: str, temperature: float
) -> tuple[dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], dict[str, str]]:
    """The peers' KD losses for `objective` that import, each as loss(student [1, N, V], teacher), and
    the peers that define `objective` but do not import, with the reason (the report says so)."""
    if PEERS.is_dir() and str(PEERS) not in sys.path:
        sys.path.append(str(PEERS))
    peers: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
    missing: dict[str, str] = {}
    beta = {"fkl": 0.0, "js": 0.5}.get(objective)
    if beta is not None:
        try:
            os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
            from trl.experimental.gkd import GKDTrainer

            # labels (none ignored) make its reduction the mean over positions, as the project's
            peers["TRL generalized_jsd_loss"] = lambda s, t: GKDTrainer.generalized_jsd_loss(
                s, t, labels=torch.zeros(s.shape[:2], dtype=torch.long, device=s.device), beta=beta,
                temperature=temperature,
            )  # fmt: skip
        except Exception as exc:  # ImportError, or a peer that breaks on import against this torch
            missing["TRL generalized_jsd_loss"] = f"{type(exc).__name__}: {exc}"
    if objective == "fkl":
        try:
            from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

            chunked = ForwardKLWithChunkedOutputLoss(num_output_chunks=8)
            peers["torchtune ForwardKLWithChunkedOutputLoss (gradient only)"] = lambda s, t: chunked(
                list((s / temperature).chunk(8, dim=1)), list((t / temperature).chunk(8, dim=1)),
                torch.zeros(s.shape[:2], dtype=torch.long, device=s.device),
            )  # fmt: skip
        except Exception as exc:
            missing["torchtune ForwardKLWithChunkedOutputLoss (gradient only)"] = (
                f"{type(exc).__name__}: {exc}"
            )
    return peers, missing


QWEN_STUDENT_ROWS, QWEN_TEACHER_ROWS, QWEN_TOKENIZER = 151936, 152064, 151665


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: one number for a value or a whole gradient."""
    scale = expected.detach().double().abs().max().clamp(min=1e-30)
    return float((actual.detach().double() - expected.detach().double()).abs().max() / scale)


def _measure(
    step: Callable[[], torch.Tensor], reset: Callable[[], None], device: str, repeats: int
) -> dict[str, Any]:
    """Peak memory of one `step()` (after `reset()`), then its median time over `repeats` fresh runs."""
    reset()
    gc.collect()
    memory = peak_memory(step, device)
    value = memory.result

    def timed() -> None:
        reset()
        step()

    timing = median_seconds(timed, repeats=repeats, warmup=0)  # the memory run was the warm-up
    return {
        "value": float(value),
        "peak_mib": memory.peak_bytes / MIB,
        "retained_mib": memory.retained_bytes / MIB,
        **timing,
    }


# -- part 1: kd_loss from logits --------------------------------------------------------------------------------
def bench_kd_loss(
    args: argparse.Namespace,
    device: str,
    peers: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
) -> list[dict[str, Any]]:
    rows = []
    for vocab in args.vocabs:
        rows += _kd_loss_at(vocab, args, device, peers)
        gc.collect()
    return rows


def _kd_loss_at(
    vocab: int,
    args: argparse.Namespace,
    device: str,
    peers: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
) -> list[dict[str, Any]]:
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (1, args.tokens, vocab)
    teacher = 2.0 * torch.randn(shape, generator=generator, device=device)
    student = (teacher + torch.randn(shape, generator=generator, device=device)).requires_grad_(True)
    mask = torch.ones(shape[:2], dtype=torch.bool, device=device)

    def reset() -> None:
        student.grad = None

    def textbook() -> torch.Tensor:
        loss = divergence(args.objective, student[0], teacher[0], args.temperature).mean()
        loss.backward()
        return loss.detach()

    def project(chunk_size: int | None) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            loss = kd_loss(args.objective, student, teacher, mask, args.temperature, chunk_size=chunk_size)
            loss.backward()
            return loss.detach()

        return step

    def peer(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            loss = loss_fn(student, teacher)
            loss.backward()
            return loss.detach()

        return step

    paths = [
        ("unchunked", None, textbook),
        (f"kd_loss, chunk {args.chunk_size}", args.chunk_size, project(args.chunk_size)),
        ("kd_loss, default", None, project(None)),
        *((name, None, peer(loss_fn)) for name, loss_fn in peers.items()),
    ]
    rows: list[dict[str, Any]] = []
    reference_grad = None
    for name, chunk_size, step in paths:
        row = {"vocab": vocab, "tokens": args.tokens, "path": name, "chunk_size": chunk_size}
        row |= _measure(step, reset, device, args.repeats)
        if reference_grad is None:
            reference_grad = student.grad
        else:
            reference = rows[0]
            row["grad_relative_difference"] = _relative(student.grad, reference_grad)
            row["value_relative_difference"] = abs(row["value"] - reference["value"]) / abs(
                reference["value"]
            )
            row["peak_vs_unchunked"] = row["peak_mib"] / reference["peak_mib"]
        rows.append(row)
        print(_kd_line(row), flush=True)
    project_row = next(row for row in rows if row["path"] == "kd_loss, default")
    for row in rows:  # every path beside the project's default loss: the peers' ratios
        row["time_vs_project"] = row["median_s"] / project_row["median_s"]
        row["peak_vs_project"] = row["peak_mib"] / project_row["peak_mib"]
    return rows


def _kd_line(row: dict[str, Any]) -> str:
    path = row["path"]
    extra = (
        f", {row['peak_vs_unchunked']:.1%} of unchunked, value rel. diff {row['value_relative_difference']:.1e}"
        if "peak_vs_unchunked" in row
        else ""
    )
    return (
        f"kd_loss V={row['vocab']:,} {path}: peak {row['peak_mib']:,.0f} MiB above the logits{extra}; "
        f"median {row['median_s']:.3f} s"
    )


# -- part 2: fused vs naive ------------------------------------------------------------------------------------
def bench_fused(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    tokens = args.fused_tokens
    generator = torch.Generator(device=device).manual_seed(1)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(shape, generator=generator, device=device)

    student_hidden = randn(1, tokens, args.student_hidden).requires_grad_(True)
    student_weight = randn(QWEN_STUDENT_ROWS, args.student_hidden, scale=args.student_hidden**-0.5)
    student_weight.requires_grad_(True)
    teacher_hidden = randn(1, tokens, args.teacher_hidden)
    teacher_weight = randn(QWEN_TEACHER_ROWS, args.teacher_hidden, scale=2 * args.teacher_hidden**-0.5)
    labels = torch.randint(0, QWEN_TOKENIZER, (1, tokens), generator=generator, device=device)
    config = KDConfig(objective=args.objective, temperature=args.temperature, kd_rate=0.5)

    def naive() -> torch.Tensor:
        student_logits = student_hidden @ student_weight.T
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.T
        # Position t predicts labels[t + 1]; CE over the student's full head, KD over the tokenizer's ids.
        shifted, targets = student_logits[0, :-1], labels[0, 1:]
        ce = torch.nn.functional.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX)
        kd = divergence(
            args.objective,
            shifted[:, :QWEN_TOKENIZER],
            teacher_logits[0, :-1, :QWEN_TOKENIZER],
            args.temperature,
        ).mean()
        del student_logits, teacher_logits, shifted
        loss = 0.5 * ce + 0.5 * kd
        loss.backward()
        return loss.detach()

    def from_logits(chunk_size: int | None) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            student_logits = student_hidden @ student_weight.T
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T
            loss, _ = distillation_loss(
                student_logits,
                teacher_logits,
                labels,
                config.model_copy(update={"chunk_size": chunk_size}),
                vocab_size=QWEN_TOKENIZER,
            )
            del student_logits, teacher_logits
            loss.backward()
            return loss.detach()

        return step

    def fused() -> torch.Tensor:
        loss, _ = fused_distillation_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            config,
            vocab_size=QWEN_TOKENIZER,
            chunk_size=args.fused_chunk_size,
        )
        loss.backward()
        return loss.detach()

    def reset() -> None:
        student_hidden.grad = student_weight.grad = None

    paths = [
        ("naive", None, naive),
        ("full logits, distillation_loss", args.chunk_size, from_logits(args.chunk_size)),
        ("fused", args.fused_chunk_size, fused),
    ]
    rows: list[dict[str, Any]] = []
    reference: dict[str, Any] = {}
    for name, chunk_size, step in paths:
        row = {"path": name, "tokens": tokens, "chunk_size": chunk_size}
        row |= _measure(step, reset, device, args.fused_repeats)
        grads = {"hidden": student_hidden.grad, "head": student_weight.grad}
        if not reference:
            reference = {**row, "grads": grads}
        else:
            row["value_relative_difference"] = abs(row["value"] - reference["value"]) / abs(
                reference["value"]
            )
            for key, grad in grads.items():
                row[f"{key}_grad_relative_difference"] = _relative(grad, reference["grads"][key])
            row["peak_vs_naive"] = row["peak_mib"] / reference["peak_mib"]
        rows.append(row)
        print(_fused_line(row), flush=True)
        reset()
    return rows


def _fused_line(row: dict[str, Any]) -> str:
    extra = (
        f", {row['peak_vs_naive']:.1%} of naive, value rel. diff {row['value_relative_difference']:.1e}, "
        f"grad rel. diff hidden {row['hidden_grad_relative_difference']:.1e} head "
        f"{row['head_grad_relative_difference']:.1e}"
        if "peak_vs_naive" in row
        else ""
    )
    return (
        f"{row['path']} ({row['tokens']} tokens): peak {row['peak_mib']:,.0f} MiB above the inputs "
        f"(of which kept: {row['retained_mib']:,.0f} MiB of gradients){extra}; median {row['median_s']:.2f} s"
    )


# -- the report ---------------------------------------------------------------------------------------------------
def markdown(
    settings: dict[str, Any], kd_rows: list[dict[str, Any]], fused_rows: list[dict[str, Any]]
) -> str:
    lines = [
        f"KD loss forward + backward, objective {settings['objective']}, temperature {settings['temperature']}, "
        "float32; peak = memory allocated above the inputs during the call (gradients included).",
        "",
    ]
    if kd_rows:
        lines += [
            f"`kd_loss` from logits, {settings['tokens']} positions, student logits requiring grad:",
            "",
            "| vocabulary | path | peak above the logits (MiB) | vs unchunked | value rel. diff | "
            "grad rel. diff | median time (s) | time / kd_loss default | peak / kd_loss default |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in kd_rows:
            chunked = "peak_vs_unchunked" in row
            ratios = f"| {row['time_vs_project']:.2f} | {row['peak_vs_project']:.2f} |"
            lines.append(
                f"| {row['vocab']:,} | {row['path']} "
                f"| {row['peak_mib']:,.0f} | {row['peak_vs_unchunked']:.1%} | "
                f"{row['value_relative_difference']:.1e} | {row['grad_relative_difference']:.1e} "
                f"| {row['median_s']:.3f} " + ratios
                if chunked
                else f"| {row['vocab']:,} | unchunked | {row['peak_mib']:,.0f} | 100% | | | {row['median_s']:.3f} "
                + ratios
            )
        lines.append("")
        for name, reason in settings.get("missing_peers", {}).items():
            lines += [
                f"Not measured: {name}, it does not import here ({reason}); install: {PEER_INSTALL}.",
                "",
            ]
    if fused_rows:
        lines += [
            f"The distill loss (0.5 CE + 0.5 KD) from hidden states, {fused_rows[0]['tokens']} positions: student "
            f"hidden {settings['student_hidden']} x {QWEN_STUDENT_ROWS:,} head rows, teacher hidden "
            f"{settings['teacher_hidden']} x {QWEN_TEACHER_ROWS:,}, KD over {QWEN_TOKENIZER:,} ids; gradients "
            "to the student's hidden states and head (the head's gradient, "
            f"{QWEN_STUDENT_ROWS * settings['student_hidden'] * 4 / MIB:,.0f} MiB, is part of every peak):",
            "",
            "| path | chunk | peak above the inputs (MiB) | vs naive | value rel. diff | hidden grad rel. diff | "
            "head grad rel. diff | median time (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in fused_rows:
            if "peak_vs_naive" in row:
                lines.append(
                    f"| {row['path']} | {row['chunk_size']} | {row['peak_mib']:,.0f} | {row['peak_vs_naive']:.1%} "
                    f"| {row['value_relative_difference']:.1e} | {row['hidden_grad_relative_difference']:.1e} "
                    f"| {row['head_grad_relative_difference']:.1e} | {row['median_s']:.2f} |"
                )
            else:
                lines.append(
                    f"| {row['path']} | | {row['peak_mib']:,.0f} | 100% | | | | {row['median_s']:.2f} |"
                )
        if settings["fused_tokens"] != settings["tokens"]:
            lines += [
                "",
                f"(the second table at {settings['fused_tokens']} positions: {settings['fused_note']})",
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 152064])
    parser.add_argument("--chunk-size", type=int, default=128, help="positions per chunk of kd_loss")
    parser.add_argument("--objective", default="fkl")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--fused-tokens", type=int, default=None, help="positions in part 2; default --tokens"
    )
    parser.add_argument(
        "--fused-chunk-size", type=int, default=64, help="positions per chunk of the fused loss"
    )
    parser.add_argument("--fused-repeats", type=int, default=3)
    parser.add_argument("--student-hidden", type=int, default=1536, help="Qwen2.5-1.5B")
    parser.add_argument("--teacher-hidden", type=int, default=3584, help="Qwen2.5-7B")
    parser.add_argument("--parts", nargs="+", choices=["kd_loss", "fused"], default=["kd_loss", "fused"])
    parser.add_argument(
        "--fused-note", default="", help="why part 2 runs at fewer positions (for the report)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 128 tokens, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats, args.fused_repeats = 128, 1, 1
        args.chunk_size, args.fused_chunk_size = 32, 32
        if args.fused_tokens is None:
            args.fused_tokens = 128
    if args.fused_tokens is None:
        args.fused_tokens = args.tokens
    device = "cuda" if torch.cuda.is_available() else "cpu"

    settings = {
        k: getattr(args, k)
        for k in (
            "tokens",
            "vocabs",
            "chunk_size",
            "objective",
            "temperature",
            "repeats",
            "fused_tokens",
            "fused_chunk_size",
            "fused_repeats",
            "student_hidden",
            "teacher_hidden",
            "fused_note",
            "parts",
            "quick",
        )
    }
    settings["device"] = device
    peers, missing_peers = peer_losses(args.objective, args.temperature)
    for name, reason in missing_peers.items():
        print(f"peer {name}: not measured, it does not import ({reason}); install: {PEER_INSTALL}")
    settings["missing_peers"] = missing_peers
    kd_rows = bench_kd_loss(args, device, peers) if "kd_loss" in args.parts else []
    fused_rows = bench_fused(args, device) if "fused" in args.parts else []
    goals = {}
    big = [r for r in kd_rows if r["vocab"] == 152064 and r["chunk_size"] == args.chunk_size]
    if big:
        goals["chunked_at_152k"] = {
            "peak_vs_unchunked": big[0]["peak_vs_unchunked"],
            "value_relative_difference": big[0]["value_relative_difference"],
            "met": big[0]["peak_vs_unchunked"] <= 0.35 and big[0]["value_relative_difference"] < 1e-5,
        }
    fused = [r for r in fused_rows if r["path"] == "fused"]
    if fused:
        goals["fused_vs_naive"] = {
            "peak_vs_naive": fused[0]["peak_vs_naive"],
            "met": fused[0]["peak_vs_naive"] <= 0.25,
        }
    for name, goal in goals.items():
        print(f"goal {name}: {'met' if goal['met'] else 'MISSED'} {goal}")
    results = {"settings": settings, "kd_loss": kd_rows, "fused": fused_rows, "goals": goals}
    json_path, md_path = write_report("kd_loss", results, markdown(settings, kd_rows, fused_rows))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
