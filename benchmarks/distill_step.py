"""Benchmark 2: one distill step against its lower bound.

A distill step is a teacher forward (no grad) + a student forward/backward on (1 - kd_rate) CE + kd_rate KD
+ the optimizer step. It cannot be cheaper than a teacher forward plus one plain SFT step of the student
on the same tokens: `ratio = (teacher forward + student SFT step) / distill step` says how close to that
bound the KD loss gets (1.0: the KD term costs nothing; the issue's goal is at least 0.85).

The steps are timed in rounds (teacher forward, SFT step, then a distill step per objective), and each
objective's ratio is the median over rounds of that round's ratio: the machine's drift from minute to
minute cancels out of it.

    python benchmarks/distill_step.py                       # CPU preset: 1024 tokens, 32k vocabulary, fkl
    python benchmarks/distill_step.py --objectives all      # every objective, in the same rounds
    python benchmarks/distill_step.py --preset qwen2.5      # GPU: Qwen2.5-1.5B student, 7B teacher, 152k vocab
    python benchmarks/distill_step.py --teacher-cache 32    # also a step reading the teacher's top-32 cache
    python benchmarks/distill_step.py --preset demo --teacher-cache 32   # the embedded default's models

With `--teacher-cache K`, each objective also gets a `cached_step`: the same step with the teacher read from
its top-K cache (distill.teacher_cache) instead of a teacher forward; its speedup is live / cached.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_seconds, summarize, write_report  # noqa: E402

from warmup_distill_kedro.core.kd.cache import (  # noqa: E402
    build_teacher_topk,
    cached_examples,
    collate_cached,
    topk_distillation_loss,
)
from warmup_distill_kedro.core.kd.divergences import OBJECTIVES  # noqa: E402
from warmup_distill_kedro.core.kd.losses import KDConfig, distillation_loss  # noqa: E402
from warmup_distill_kedro.core.models.encoding import IGNORE_INDEX, EncodedExample, causal_lm_loss  # noqa: E402

# (hidden, layers, heads, kv heads, intermediate) of each model, vocabulary, batch, sequence length.
PRESETS = {
    "cpu": {
        "student": (256, 4, 4, 4, 704),
        "teacher": (512, 4, 8, 8, 1408),
        "vocab": 32000,
        "batch": 8,
        "length": 128,
    },
    "demo": {  # the embedded default's models (conf/base/parameters_bootstrap.yml), a training batch of 32
        "student": (64, 1, 4, 4, 192),
        "teacher": (96, 2, 4, 4, 256),
        "vocab": 512,
        "batch": 32,
        "length": 64,
    },
    "tiny": {  # the smoke test's: seconds, not a measurement
        "student": (32, 1, 2, 2, 64),
        "teacher": (64, 1, 2, 2, 128),
        "vocab": 512,
        "batch": 2,
        "length": 16,
    },
    "qwen2.5": {  # Qwen2.5-1.5B and Qwen2.5-7B configs, randomly initialised, 7B's padded vocabulary
        "student": (1536, 28, 12, 2, 8960),
        "teacher": (3584, 28, 28, 4, 18944),
        "vocab": 152064,
        "batch": 4,
        "length": 1024,
    },
}


def build(shape: tuple[int, int, int, int, int], vocab: int, dtype: torch.dtype, device: str, seed: int):
    hidden, layers, heads, kv_heads, intermediate = shape
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="cap on the KD loss chunk (positions); default: sized for the device",
    )
    parser.add_argument(
        "--objectives", default="fkl", help="comma-separated KD objectives, or 'all' (default: fkl)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--teacher-cache", type=int, default=None, metavar="K", help="also time cached steps")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    student = build(preset["student"], preset["vocab"], dtype, device, seed=0)
    teacher = build(preset["teacher"], preset["vocab"], dtype, device, seed=1).eval().requires_grad_(False)
    if args.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    batch_size, length = preset["batch"], preset["length"]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, preset["vocab"], (batch_size, length), generator=generator)
    labels = input_ids.clone()
    labels[:, : length // 4] = IGNORE_INDEX  # the prompt quarter counts in neither loss
    batch = {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device),
    }
    objectives = list(OBJECTIVES) if args.objectives == "all" else args.objectives.split(",")
    configs = {
        objective: KDConfig(objective=objective, temperature=2.0, kd_rate=0.5, chunk_size=args.chunk_size)
        for objective in objectives
    }
    tokens = batch_size * length

    def teacher_forward():
        with torch.no_grad():
            return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def optimizer_step(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sft_step():
        loss, _ = causal_lm_loss(student, batch)
        optimizer_step(loss)

    def distill_step(kd: KDConfig):
        def step():
            teacher_logits = teacher_forward()
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            student_logits = student(**inputs).logits
            loss, _ = distillation_loss(student_logits, teacher_logits, batch["labels"], kd)
            optimizer_step(loss)

        return step

    steps = {"teacher_forward": teacher_forward, "student_sft_step": sft_step}
    steps |= {f"distill_step_{objective}": distill_step(kd) for objective, kd in configs.items()}
    if args.teacher_cache:
        rows = [
            EncodedExample(input_ids=ids.tolist(), labels=row.tolist(), truncated=False)
            for ids, row in zip(input_ids, labels, strict=True)
        ]
        cache = build_teacher_topk(
            teacher, rows, 0, args.teacher_cache, 2.0, preset["vocab"], batch_size, {}, show_progress=False
        )
        cached_batch = {k: v.to(device) for k, v in collate_cached(cached_examples(rows, cache), 0).items()}

        def cached_step(kd: KDConfig):
            def step():
                inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                loss, _ = topk_distillation_loss(student(**inputs).logits, cached_batch, kd, preset["vocab"])
                optimizer_step(loss)

            return step

        steps |= {f"cached_step_{objective}": cached_step(kd) for objective, kd in configs.items()}
    times = interleaved_seconds(steps, args.repeats)
    bounds = [t + s for t, s in zip(times["teacher_forward"], times["student_sft_step"], strict=True)]
    timings = {name: summarize(step_times) for name, step_times in times.items()}
    per_objective = {}
    for objective in objectives:
        step_times = times[f"distill_step_{objective}"]
        per_objective[objective] = {
            "distill_tokens_per_s": tokens / timings[f"distill_step_{objective}"]["median_s"],
            "round_ratios": [b / d for b, d in zip(bounds, step_times, strict=True)],
        }
        per_objective[objective]["ratio_to_bound"] = statistics.median(
            per_objective[objective]["round_ratios"]
        )
        if args.teacher_cache:
            cached_times = times[f"cached_step_{objective}"]
            per_objective[objective]["cached_speedup"] = statistics.median(
                d / c for d, c in zip(step_times, cached_times, strict=True)
            )
            per_objective[objective]["teacher_forward_share"] = statistics.median(
                t / d for t, d in zip(times["teacher_forward"], step_times, strict=True)
            )
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    results = {
        "preset": args.preset,
        "config": {**preset, "objectives": objectives, "chunk_size": args.chunk_size, "dtype": str(dtype)},
        "gradient_checkpointing": args.gradient_checkpointing,
        "tokens_per_step": tokens,
        "timings": timings,
        "bound_s": summarize(bounds),
        "objectives": per_objective,
        "peak_memory_bytes": peak,
    }

    def row(name: str, ratio: str = "") -> str:
        t = timings[name]
        milliseconds = f"{t['median_s'] * 1000:,.1f} ms | {t['min_s'] * 1000:,.0f}-{t['max_s'] * 1000:,.0f}"
        return f"| {name.replace('_', ' ')} | {milliseconds} | {tokens / t['median_s']:,.0f} | {ratio} |"

    ratio_rows = [
        row(f"distill_step_{objective}", f"**{per_objective[objective]['ratio_to_bound']:.2f}**")
        for objective in objectives
    ]
    if args.teacher_cache:
        ratio_rows += [
            row(
                f"cached_step_{objective}",
                f"top-{args.teacher_cache} cache: {per_objective[objective]['cached_speedup']:.2f}x the live step "
                f"(teacher forward {100 * per_objective[objective]['teacher_forward_share']:.0f}% of it)",
            )
            for objective in objectives
        ]
    bound = results["bound_s"]
    markdown = "\n".join(
        [
            f"Preset `{args.preset}`: {tokens} tokens per step ({batch_size} x {length}), vocabulary "
            f"{preset['vocab']:,}, KD at T 2, kd_rate 0.5, chunk {args.chunk_size or 'sized for the device'}, "
            f"{dtype}; {args.repeats} rounds.",
            "",
            "| step | median | range (ms) | tokens/s | ratio: bound / distill step |",
            "| --- | --- | --- | --- | --- |",
            row("teacher_forward"),
            row("student_sft_step"),
            f"| bound: teacher forward + SFT step | {bound['median_s'] * 1000:,.1f} ms | "
            f"{bound['min_s'] * 1000:,.0f}-{bound['max_s'] * 1000:,.0f} | {tokens / bound['median_s']:,.0f} | |",
            *ratio_rows,
            "",
            "Ratio: median over rounds of (teacher forward + SFT step) / distill step, each round's own "
            "times (goal >= 0.85)" + (f"; peak GPU memory {peak / 2**30:.1f} GiB." if peak else "."),
        ]
    )
    suffix = {"fkl": "", "all": "_all"}.get(args.objectives, f"_{'-'.join(objectives)}")
    name = f"distill_step_{args.preset}{suffix}"
    name += f"_chunk{args.chunk_size}" if args.chunk_size else ""
    name += "_checkpointing" if args.gradient_checkpointing else ""
    name += f"_cache{args.teacher_cache}" if args.teacher_cache else ""
    json_path, _ = write_report(name, results, markdown)
    print(markdown)
    print(f"\nwrote {json_path}")


if __name__ == "__main__":
    main()
